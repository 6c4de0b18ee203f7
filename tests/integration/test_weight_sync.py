"""The checkpoint engine's transports between real processes over gloo: exact delivery, checksums,
failures that name the dead member within the timeout, and a working push after a restart."""
import multiprocessing as mp

import pytest
import torch

from checkpoint_engine.buckets import checksum, dtype_name, pack, plan_full, trailer_bytes, unpack, verify_chunk, write_checksum
from checkpoint_engine.group import DEAD_AFTER_S
from tests.helpers import pick_port
from tests.sync_members import BUCKET, _bits, _metas, make_plan, member, source_tensors


def run_group(mode, sources, world, die_at_bucket=None, die_rank=None, timeout=10.0, corrupt_at_bucket=None):
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), pick_port()
    procs = [ctx.Process(target=member, args=(r, world, sources, mode, port, results,
                                             die_at_bucket if r == die_rank else None, timeout, corrupt_at_bucket))
             for r in range(world)]
    for p in procs:
        p.start()
    expected = world - (1 if die_rank is not None else 0)
    out = dict((r, rest) for r, *rest in (results.get(timeout=120) for _ in range(expected)))
    for p in procs:
        p.join(timeout=60)
    return out


def expected_for(receiver: int, receivers: int, mode: str, sources: int) -> dict[str, torch.Tensor]:
    plan = make_plan(mode, sources, receivers)
    full = {n: t for s in range(sources) for n, t in source_tensors(s).items()}
    out = {}
    for bucket in plan:
        for meta in bucket.layout(receiver):
            out[meta.name] = meta.region.of(full[meta.name]) if meta.region else full[meta.name]
    return out


@pytest.mark.parametrize("mode,sources,world", [("broadcast", 1, 2), ("broadcast", 2, 4),
                                                ("reduce_scatter", 1, 3), ("reduce_scatter", 2, 4),
                                                ("shard", 1, 3), ("shard", 2, 4)])
def test_push_delivers_bitwise_identical_tensors(mode, sources, world):
    receivers = world - sources
    plan = make_plan(mode, sources, receivers)
    assert any(t.numel() * t.element_size() > BUCKET for t in source_tensors(0).values())
    out = run_group(mode, sources, world)
    for rank in range(world):
        status, got, stats = out[rank]
        assert status == "ok", got
        assert stats["buckets"] == len(plan)
        if rank < sources:
            assert got == {}
            continue
        expected = expected_for(rank - sources, receivers, mode, sources)
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert got[name] == (dtype_name(tensor.dtype), tuple(tensor.shape), _bits(tensor).numpy().tobytes()), name
        if mode != "broadcast":  # each receiver got only its rows of the sliceable tensors
            assert got["s0.big"][1][0] == 64 // receivers
        if mode == "shard":  # a receiver takes in only its own chunks; each owner sends them once
            assert stats["bytes_received"] == sum(b.chunk_bytes[rank - sources] for b in plan)
            assert out[0][2]["bytes_sent"] == sum(sum(b.chunk_bytes) + 8 * sources * receivers
                                                  for b in plan if b.owner == 0)


def test_receiver_killed_mid_push_fails_every_survivor_naming_it_long_before_the_timeout():
    """gloo can leave a survivor waiting on the dead member until the collective's timeout; its stale
    heartbeat ends the wait after DEAD_AFTER_S instead."""
    timeout = 60.0
    out = run_group("broadcast", 1, 3, die_at_bucket=1, die_rank=2, timeout=timeout)
    assert set(out) == {0, 1}
    for rank in (0, 1):
        status, message, seconds = out[rank]
        assert status == "error"
        assert "SyncError" in message and "receiver 1" in message, message
        assert seconds < DEAD_AFTER_S + 10 < timeout, (seconds, message)
    # A restarted receiver in a fresh group: the next push works.
    again = run_group("broadcast", 1, 3)
    assert all(again[r][0] == "ok" for r in range(3))
    assert again[2][1]["s0.big"][2] == _bits(source_tensors(0)["s0.big"]).numpy().tobytes()


@pytest.mark.parametrize("mode", ["broadcast", "reduce_scatter", "shard"])
def test_a_chunk_corrupted_after_its_checksum_fails_every_member_naming_the_bucket(mode):
    plan = make_plan(mode, 1, 2)
    out = run_group(mode, 1, 3, corrupt_at_bucket=1)
    for rank in range(3):
        status, message, _ = out[rank]
        assert status == "error", message
        assert "bucket 1 checksum mismatch on receiver" in message and plan[1].names()[0] in message, message


# --- single-process pieces --------------------------------------------------------------------------
def test_checksum_is_linear_so_summed_contributions_verify():
    g = torch.Generator().manual_seed(0)
    data = 4096
    a = torch.zeros(data + trailer_bytes(2), dtype=torch.uint8)
    b = torch.zeros_like(a)
    a[:1024] = torch.randint(0, 256, (1024,), dtype=torch.uint8, generator=g)
    b[2048:data] = torch.randint(0, 256, (data - 2048,), dtype=torch.uint8, generator=g)
    write_checksum(a, data, 0, 2)
    write_checksum(b, data, 1, 2)
    summed = (a.view(torch.int64) + b.view(torch.int64)).view(torch.uint8)  # what the reduce-scatter does
    assert verify_chunk(summed, data, 2)
    flipped = summed.clone()
    flipped[100] ^= 1  # one flipped bit
    assert not verify_chunk(flipped, data, 2)
    top = summed.clone()
    top[15] ^= 0x80  # the sign bit of word 1: 2^63 times an even weight would vanish mod 2^64; weights are odd
    assert not verify_chunk(top, data, 2)
    words = summed[:data].clone().view(torch.int64)
    words[:2] = torch.tensor([5, 9], dtype=torch.int64)
    swapped = words.clone()
    swapped[:2] = torch.tensor([9, 5], dtype=torch.int64)  # the same words, in the wrong places
    assert checksum(words.view(torch.uint8)) != checksum(swapped.view(torch.uint8))


@pytest.mark.parametrize("words", [8, 64, 64 * 3 + 40])
def test_checksum_equals_the_position_weighted_sum_written_out(words):
    """The row/column-sum evaluation against sum_p (2p + 1) * x_p computed with Python integers."""
    g = torch.Generator().manual_seed(words)
    data = torch.randint(0, 256, (8 * words,), dtype=torch.uint8, generator=g)
    values = [int.from_bytes(bytes(data[8 * p:8 * p + 8].tolist()), "little", signed=True) for p in range(words)]
    assert checksum(data) == sum((2 * p + 1) * x for p, x in enumerate(values)) % (1 << 64)


def test_plans_cut_buckets_and_pack_round_trips():
    tensors = source_tensors(0)
    plan = plan_full({0: _metas(tensors)}, BUCKET)
    big = next(b for b in plan if any(m.name == "s0.big" for m in b.layout(0)))
    assert len(big.layout(0)) == 1 and big.chunk_bytes[0] >= 64 * 128 * 4  # alone, larger than a bucket
    assert all(b.chunk_bytes[0] <= BUCKET for b in plan if b is not big)
    assert all(m.offset % 64 == 0 for b in plan for m in b.layout(0))
    for bucket in plan:
        chunk = torch.full((bucket.chunk_bytes[0] + trailer_bytes(1),), 255, dtype=torch.uint8)
        pack(chunk, bucket.chunk_bytes[0], bucket.layout(0), tensors)
        for name, view in unpack(chunk, bucket.layout(0)):
            assert torch.equal(_bits(view), _bits(tensors[name]))
    first = torch.zeros(plan[0].chunk_bytes[0] + trailer_bytes(1), dtype=torch.uint8)
    with pytest.raises(ValueError, match="s0.fp32"):  # a tensor that does not match the plan is named
        pack(first, plan[0].chunk_bytes[0], plan[0].layout(0), {"s0.fp32": torch.zeros(3)})
