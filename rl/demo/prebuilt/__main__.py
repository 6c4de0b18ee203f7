"""Build a preset's warm-started demo model (or take it from the cache) and copy it here, to commit:
python -m rl.demo.prebuilt --config-name swarm_wide_search [overrides...]"""
from __future__ import annotations

import os
import shutil
import sys

from rl.demo.prebuilt import HERE
from rl.demo.warm_start import policy_model_path
from rl.train import preset_config


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--config-name":
        sys.exit(__doc__)
    path = policy_model_path(preset_config(argv[1], argv[2:]))
    dest = os.path.join(HERE, os.path.basename(path))
    if os.path.abspath(path) != dest:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(path, dest)
    print(dest)


if __name__ == "__main__":
    main(sys.argv[1:])
