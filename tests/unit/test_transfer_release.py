"""A sync member's CPU slot buffers live in /dev/shm; releasing the member removes their files (a
process killed at shutdown never would, and each file holds a bucket's worth of RAM)."""
import gc
import os

from checkpoint_engine.buckets import TensorMeta, plan_full
from checkpoint_engine.transfer import TransferMember


def _shm_file(buf) -> str:
    return os.path.join("/dev/shm", buf.untyped_storage()._share_filename_cpu_()[1].decode().lstrip("/"))


def test_release_unlinks_the_slot_buffers_shared_memory_files():
    plan = plan_full({0: [TensorMeta("w", "float32", (64, 64))]}, 1 << 20)
    member = TransferMember(None, plan, "colocated", num_sources=1, rank=0, device="cpu")
    files = [_shm_file(b) for b in member.slots + member.send_slots]
    assert files and all(os.path.exists(f) for f in files)
    member.release()
    gc.collect()
    assert not any(os.path.exists(f) for f in files) and member.buffer_bytes == 0
