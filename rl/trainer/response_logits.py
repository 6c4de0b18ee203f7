"""Per-token logprobs without the logits nobody reads.

The policy loss needs one number per response token: the logprob of the sampled token at the
sample's temperature. A plain forward materialises fp32 logits over the whole vocabulary at every
position, prompt included, and then copies them several times (Megatron's [batch, seq] transpose, a
division by the temperature, our transpose back, the cross entropy's own buffer), which on a 50k
vocabulary is most of a step's memory and much of its time. Here a forward pre-hook on the output
layer keeps only the positions from the micro-batch's first response-predicting one onwards and
divides them by each row's temperature (logits/T = W (h/T): the output layer has no bias), and
Megatron computes the (vocab-parallel) cross entropy in place on the layer's output from labels. What
remains is one [kept positions, batch, vocab/TP] buffer.

Not trimmed: under sequence parallelism (the output layer sees a slice of the sequence). Without
labels: a padded vocabulary (TP with a vocabulary that does not divide) must mask the padding rows,
which Megatron's loss path cannot, so there the logits come back and are masked before the entropy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class ResponseLogits:
    """Installed on a last-stage model's output layer; inactive (a plain forward) unless `select` is set."""

    def __init__(self, model, trims: bool):
        self.trims = trims
        self.first: Optional[int] = None
        self.temperature: Optional[torch.Tensor] = None
        model.output_layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def select(self, first: int, temperature: torch.Tensor) -> int:
        """For the next forward: positions from `first` on, divided by `temperature` [batch]. Returns
        the first position kept."""
        self.first, self.temperature = (first if self.trims else 0), temperature
        return self.first

    def _hook(self, _module, args, kwargs):
        if self.first is None:
            return None
        hidden = args[0][self.first:] / self.temperature.to(args[0].device, args[0].dtype)[None, :, None]
        self.first, self.temperature = None, None
        return (hidden, *args[1:]), kwargs


def labels_for(tokens: torch.Tensor, first: int) -> torch.Tensor:
    """The next token of every kept position (the last position predicts nothing: label 0, unread)."""
    return F.pad(tokens[:, first + 1:], (0, 1))


def logprobs_from_loss(loss: torch.Tensor, first: int) -> torch.Tensor:
    """Megatron's per-token loss [batch, kept] to logprobs [batch, seq - 1], zeros before `first`."""
    return F.pad(-loss[:, :-1], (first, 0))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, first: int, vocab_size: int,
                         tp_rank: int) -> torch.Tensor:
    """The same from already-divided vocab-parallel logits [batch, kept, vocab/TP], with the padded
    vocabulary rows masked out."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    start = tp_rank * logits.shape[-1]
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    logits = logits[:, :-1].masked_fill(ids >= vocab_size, float("-inf"))
    targets = tokens[:, first + 1:].to(logits.device)
    nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous())
    return F.pad(-nll.transpose(0, 1), (first, 0))
