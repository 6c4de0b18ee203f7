"""A roofline projection of one RL step on H100 clusters (docs/scaling.md): memory per GPU and a lower
bound on step time for a 7B dense model on 1 x 8 H100 and a 30B-A3B MoE on 4 x 8 H100, each input
either a hardware or model fact (cited below) or a setting of ours.

Not a measurement: no GPU ran this. Each phase is timed at the hardware's peak (HBM bandwidth for
decode, dense BF16 FLOP/s for training, NVLink / InfiniBand / PCIe bandwidth for moving bytes), so
a real step takes longer; docs/scaling.md puts published step times beside the bound.

    .venv/bin/python benchmarks/scaling_projection.py
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9

# NVIDIA H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s; 989 TFLOP/s dense BF16 (1,979 with sparsity);
# NVLink 900 GB/s per GPU (both directions together); PCIe Gen5 x16 128 GB/s (both directions).
# NVIDIA DGX H100: 8 x ConnectX-7 at 400 Gb/s, one per GPU (50 GB/s per GPU each way).
H100 = dict(hbm_bytes=80 * GB, hbm_bw=3.35e12, bf16_flops=989e12, nvlink_bw=450 * GB, pcie_bw=64 * GB, ib_bw=50 * GB)


@dataclass
class Model:
    name: str
    params: float  # total
    active: float  # per token (MoE: routed experts only)
    expert_params: float  # inside routed experts
    layers: int
    kv_heads: int
    head_dim: int


# From the models' HF config.json: Qwen2.5-7B (28 layers, hidden 3584, 4 KV heads of 128, 7.62 B
# parameters); Qwen3-30B-A3B (48 layers, 4 KV heads of 128, 128 experts of 2048 x 768 x 3 per layer,
# 8 routed per token: 30.5 B parameters, 3.3 B active).
QWEN25_7B = Model("Qwen2.5-7B (dense)", 7.62e9, 7.62e9, 0.0, 28, 4, 128)
QWEN3_30B_A3B = Model("Qwen3-30B-A3B (MoE)", 30.5e9, 3.3e9, 48 * 128 * 3 * 2048 * 768, 48, 4, 128)


@dataclass
class Setup:
    model: Model
    nodes: int
    gpus_per_node: int
    trainer_tp: int
    trainer_ep: int
    rollout_tp: int
    prompts: int  # per step
    samples: int  # K per prompt
    prompt_tokens: int
    response_tokens: int  # every response at its cap: the bound's worst case

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


TRAINER_BYTES_PER_PARAM = 16  # ours today: fp32 parameters (4), fp32 main_grad (4), Adam m and v (8)
ROLLOUT_BYTES_PER_PARAM = 2  # BF16 weights in SGLang (issue 21; the engine runs fp32 today)
KV_BYTES = 2  # BF16 K and V


def memory(s: Setup) -> dict[str, float]:
    """Bytes per GPU of each resident, in the phase it is resident."""
    m = s.model
    dense = m.params - m.expert_params
    trainer_params = dense / s.trainer_tp + m.expert_params / s.trainer_ep
    engines = s.gpus // s.rollout_tp
    sequences = s.prompts * s.samples / engines  # per engine, all at once
    kv = sequences * (s.prompt_tokens + s.response_tokens) * 2 * m.layers * m.kv_heads * m.head_dim * KV_BYTES
    return {"trainer state (train phase)": trainer_params * TRAINER_BYTES_PER_PARAM,
            "rollout weights (rollout phase)": m.params * ROLLOUT_BYTES_PER_PARAM / s.rollout_tp,
            "KV cache, whole batch (rollout phase)": kv / s.rollout_tp}


def step_time(s: Setup) -> dict[str, float]:
    """Lower bounds, in seconds, of each phase of one colocated step."""
    m, h = s.model, H100
    engines = s.gpus // s.rollout_tp
    sequences = s.prompts * s.samples / engines
    weights_read = m.params * ROLLOUT_BYTES_PER_PARAM / s.rollout_tp  # per GPU, every decode iteration
    kv_per_token = 2 * m.layers * m.kv_heads * m.head_dim * KV_BYTES / s.rollout_tp
    length, prompt = s.response_tokens, s.prompt_tokens
    kv_read = sequences * kv_per_token * (prompt * length + length * length / 2)  # sum over iterations
    tokens = s.prompts * s.samples * (prompt + length)
    trainer_state = memory(s)["trainer state (train phase)"]
    return {
        "rollout (decode at HBM bandwidth)": (length * weights_read + kv_read) / h["hbm_bw"],
        "pi_old logprobs (2 N_active FLOP/token)": 2 * m.active * tokens / (s.gpus * h["bf16_flops"]),
        "train (6 N_active FLOP/token)": 6 * m.active * tokens / (s.gpus * h["bf16_flops"]),
        **sync_time(s),
        "offload + onload trainer (PCIe)": 2 * trainer_state / h["pcie_bw"],
    }


def sync_time(s: Setup) -> dict[str, float]:
    """The faster transport's push: max(bytes the busiest member sends, bytes a receiver takes in) over
    the link (NVLink in one node, InfiniBand across nodes). Broadcast: the owner sends the model once,
    every GPU takes it all in. Shard: every GPU takes in 1/TP; each owner (TP rank 0 of DP replica 0
    for dense tensors, of each expert-parallel rank for experts) sends its tensors to every engine."""
    m = s.model
    payload = m.params * ROLLOUT_BYTES_PER_PARAM
    engines = s.gpus // s.rollout_tp
    link = H100["nvlink_bw"] if s.nodes == 1 else H100["ib_bw"]
    dense_owner = (m.params - m.expert_params) * ROLLOUT_BYTES_PER_PARAM * engines
    expert_owner = m.expert_params / s.trainer_ep * ROLLOUT_BYTES_PER_PARAM * engines
    options = {"broadcast": payload / link,
               "shard": max(dense_owner, expert_owner, payload / s.rollout_tp) / link}
    best = min(options, key=options.get)
    label = ", ".join(f"{k} {v:.2f} s" for k, v in options.items())
    return {f"sync ({label}; {best})": options[best]}


SETUPS = [
    Setup(QWEN25_7B, 1, 8, trainer_tp=2, trainer_ep=1, rollout_tp=1, prompts=128, samples=8,
          prompt_tokens=256, response_tokens=4096),
    Setup(QWEN3_30B_A3B, 4, 8, trainer_tp=2, trainer_ep=8, rollout_tp=2, prompts=128, samples=8,
          prompt_tokens=256, response_tokens=8192),
]


def main() -> None:
    for s in SETUPS:
        print(f"\n{s.model.name} on {s.nodes} x {s.gpus_per_node} H100: trainer TP {s.trainer_tp} EP {s.trainer_ep} "
              f"(DP {s.gpus // s.trainer_tp}), {s.gpus // s.rollout_tp} rollout engines of TP {s.rollout_tp}; "
              f"{s.prompts} prompts x {s.samples} samples, {s.prompt_tokens} + {s.response_tokens} tokens")
        for name, value in memory(s).items():
            print(f"  memory  {name:<52} {value / GB:8.1f} GB")
        phases = step_time(s)
        for name, value in phases.items():
            print(f"  time    {name:<52} {value:8.2f} s")
        print(f"  time    {'step (sum, lower bound)':<52} {sum(phases.values()):8.2f} s")


if __name__ == "__main__":
    main()
