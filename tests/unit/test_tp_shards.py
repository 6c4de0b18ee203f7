"""Per-TP-rank delivery: which region of each tensor a rollout TP rank holds (checked against SGLang's
own vocabulary sharding), and how an engine's TP-rank receivers load a bucket together.

The end-to-end check, a Megatron TP=2 trainer pushing into an SGLang TP=2 engine with every parameter
compared after each push, is `tests/integration/test_integration_loop.py::test_rl_steps_with_tensor_parallel_trainer_and_rollout`.
"""
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from checkpoint_engine.buckets import Bucket, Region, TensorMeta
from checkpoint_engine.receiver import TPRankDelivery
from rollout.sglang.tp_shards import region_rule, vocab_rows
from tests.helpers import pick_port


@pytest.fixture(scope="module")
def sglang_vocab_layer():
    from rollout.sglang import cpu as sglang_cpu

    sglang_cpu.apply()
    import sglang.srt.layers.vocab_parallel_embedding as vpe

    return vpe


@pytest.mark.parametrize("vocab", [7, 64, 100, 129, 151936, 163840])
@pytest.mark.parametrize("tp_size", [2, 3, 4, 8])
def test_vocab_rows_are_the_rows_sglangs_lm_head_loads(sglang_vocab_layer, monkeypatch, vocab, tp_size):
    vpe = sglang_vocab_layer
    monkeypatch.setattr(vpe, "_resolve_linear_group", lambda name: None)
    for rank in range(tp_size):
        monkeypatch.setattr(vpe, "get_parallel", lambda: SimpleNamespace(tp_rank=rank, tp_size=tp_size))
        indices = vpe.ParallelLMHead(vocab, 4).shard_indices
        assert vocab_rows(vocab, rank, tp_size) == (indices.org_vocab_start_index, indices.org_vocab_end_index)


def _meta(name, *shape):
    return TensorMeta(name, "float32", shape)


def test_region_rule_splits_dense_layers_and_sends_the_rest_whole():
    rule = region_rule(SimpleNamespace(model_type="qwen2"), 2)
    q = rule(_meta("model.layers.0.self_attn.q_proj.weight", 64, 32))
    assert q == [Region(0, 0, 32, 64), Region(0, 32, 32, 64)]
    assert rule(_meta("model.layers.0.self_attn.k_proj.bias", 16)) == [Region(0, 0, 8, 16), Region(0, 8, 8, 16)]
    assert rule(_meta("model.layers.3.mlp.down_proj.weight", 32, 96)) == [Region(1, 0, 48, 96), Region(1, 48, 48, 96)]
    assert rule(_meta("lm_head.weight", 100, 32)) == [Region(0, 0, 64, 100), Region(0, 64, 36, 100)]
    for whole in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.o_proj.bias",
                  "model.layers.1.mlp.experts.3.gate_proj.weight"):
        assert rule(_meta(whole, 32, 32)) == [None, None], whole
    # architectures without a rule, and TP 1, travel whole
    assert region_rule(SimpleNamespace(model_type="deepseek_v3"), 2)(_meta("lm_head.weight", 64, 8)) == [None, None]
    assert region_rule(SimpleNamespace(model_type="qwen2"), 1)(_meta("lm_head.weight", 64, 8)) == [None]
    with pytest.raises(ValueError, match="up_proj.weight: dimension 0"):
        region_rule(SimpleNamespace(model_type="llama"), 4)(_meta("model.layers.0.mlp.up_proj.weight", 30, 8))


class _Engine:
    """Stands in for the rollout engine actor: records what each load was given."""

    def __init__(self):
        self.loads, self.done = [], threading.Event()

    def load(self, shards):
        self.loads.append(shards)
        return self.done.wait


def _members(tp_size, timeout_s=5.0):
    port = pick_port()
    master = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    engine = _Engine()
    members = []
    for rank in range(tp_size):
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=False, timeout=timedelta(seconds=timeout_s))
        member = TPRankDelivery(engine.load, store, 0, rank, tp_size, timeout_s)
        member.begin(version=3)
        members.append(member)
    return master, engine, members


def _chunk(rank):
    chunk = torch.full((64,), rank, dtype=torch.uint8).share_memory_()
    return (TensorMeta(f"w{rank}", "float32", (4,), 0, Region(0, 4 * rank, 4, 12)),), chunk


def test_tp_rank_receivers_load_a_bucket_together_and_skip_a_failed_chunk():
    master, engine, members = _members(3)
    bucket = Bucket(0, (), ())
    # followers publish their chunks and wait; the leader loads all three with one request
    follower_waits = [m(bucket, *_chunk(m.tp_rank), True) for m in members[1:]]
    leader_wait = members[0](bucket, *_chunk(0), True)
    assert len(engine.loads) == 1
    shards = engine.loads[0]
    assert [tensors[0][0] for _handle, tensors in shards] == ["w0", "w1", "w2"]  # ordered by TP rank
    assert shards[2][1][0][4] == (0, 8, 12)  # region: dim, start, full size
    released = threading.Thread(target=follower_waits[0])
    released.start()
    released.join(0.5)
    assert released.is_alive(), "a follower's slot was freed before the engine finished loading"
    engine.done.set()
    leader_wait()
    released.join(5)
    follower_waits[1]()
    assert not released.is_alive()

    # a follower's chunk failed its checksum: nothing is loaded, and nobody waits for a load
    bucket = Bucket(1, (), ())
    follower_waits = [m(bucket, *_chunk(m.tp_rank), m.tp_rank != 2) for m in members[1:]]
    assert members[0](bucket, *_chunk(0), True) is None
    for wait in follower_waits:
        wait()
    assert len(engine.loads) == 1


def test_a_missing_tp_rank_receiver_fails_the_leader_within_the_timeout():
    master, engine, members = _members(2, timeout_s=1.0)
    with pytest.raises(Exception, match="[Tt]ime"):
        members[0](Bucket(0, (), ()), *_chunk(0), True)
    assert engine.loads == []
