"""The training engine: Megatron-core trainer ranks (rl/trainer/engine.py) and what they are built from.

Importing Megatron-core without Transformer Engine or Apex warns, in every process that imports it,
that it falls back to torch's norm, optimizers and multi-tensor ops; with Megatron-FSDP's start-up
notes that was about a dozen lines before a run's first useful one. Those fallbacks are what Tandem
runs on by design (no Transformer Engine, no Apex: docs/reliability.md), so exactly these messages
are silenced here, before any module of this package imports Megatron; every other warning shows.
"""
import logging
import re
import warnings

EXPECTED_FALLBACKS = ("Transformer Engine and Apex are not installed", "Apex is not installed")
for _message in EXPECTED_FALLBACKS:
    warnings.filterwarnings("ignore", message=re.escape(_message), category=UserWarning)
logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)  # "Using Megatron-FSDP without ..."
