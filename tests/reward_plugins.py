"""Reward functions the reward tests load by name or path: well-behaved ones and hostile ones."""
import asyncio
import math
import time

from rewards import reward


@reward("test_async_contains")
async def async_contains(sample, needle: str = "4"):
    await asyncio.sleep(0.01)
    return {"score": float(needle in sample.response), "length": len(sample.response)}


@reward("test_group_rank", per_group=True)
def group_rank(samples):
    """1 for the shortest response of the group, 0 for the others."""
    shortest = min(len(s.response) for s in samples)
    return [float(len(s.response) == shortest) for s in samples]


def hangs(sample):
    time.sleep(30)
    return 1.0


def raises(sample):
    raise RuntimeError("reward service unreachable")


def not_a_number(sample):
    return math.nan


async def never_yields(sample):
    if sample.metadata.get("block"):
        time.sleep(8)  # blocks the event loop it runs on
    return 1.0


def allocates(sample):
    return float(len(bytearray(2 * 2**30)))
