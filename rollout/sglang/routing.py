"""The experts SGLang routed each token to (`enable_return_routed_experts`), as a sample carries them.

SGLang reports, per request, one row per input position it ran (prompt and output, all but the last
sampled token), each with the top-k expert ids of every layer (dense layers included, as padding):
base64 of int32. A sample keeps them as a [positions, layers, topk] int16 array (`Sample.routed_experts`),
which the trainer replays under `algorithm.routing_replay: rollout` (rl/trainer/routing.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from transformers import AutoConfig

from rl.sample import NOT_ROUTED

if TYPE_CHECKING:
    from rl.sample import Sample


def routed_experts_shape(model_path: str) -> tuple[int, int]:
    """(layers, topk) of the rows SGLang reports for this model."""
    config = AutoConfig.from_pretrained(model_path)
    topk = getattr(config, "num_experts_per_tok", None)
    if not topk:
        raise ValueError(f"rollout.return_routing: {model_path} is not a mixture-of-experts model (no num_experts_per_tok)")
    return config.num_hidden_layers, topk


def decode_routed_experts(output: dict, shape: tuple[int, int]) -> np.ndarray:
    """One of SGLang's generate outputs' routing (base64 int32, decoded by SGLang's own helper) ->
    [positions, layers, topk] int16."""
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    return extract_routed_experts_from_meta_info(output).reshape(-1, *shape).astype(np.int16)


def merge_segment_routing(kept: Optional[np.ndarray], latest: np.ndarray) -> np.ndarray:
    """A partial rollout's routing after one more segment: positions already routed keep the routing
    of the segment that first ran them (the weights that sampled those tokens); the rest are new."""
    if kept is None or not len(kept):
        return latest
    return np.concatenate([kept, latest[len(kept):]])


def trainer_routes_tool_tokens(routing: np.ndarray, sample: "Sample") -> np.ndarray:
    """An agent episode's routing with its tool-result positions (response tokens outside the loss) left
    to the trainer's router: they were not sampled, so only the policy's own tokens are replayed."""
    if not sample.loss_mask:
        return routing
    start = len(sample.prompt_ids)
    tools = start + np.flatnonzero(np.asarray(sample.loss_mask[:len(routing) - start]) == 0)
    if len(tools):
        routing = routing.copy()
        routing[tools] = NOT_ROUTED
    return routing
