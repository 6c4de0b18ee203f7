"""`python -m rl.train [hydra overrides]`: run the RL job described by conf/config.yaml."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.config import Config, ConfigError, load_config

ConfigStore.instance().store(name="tandem_schema", node=Config)
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def preset_config(name: str, overrides: list[str]) -> Config:
    """The `conf/<name>.yaml` job with Hydra `overrides`, loaded and checked (for tests, benchmarks, tools)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return load_config(compose(config_name=name, overrides=overrides))


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = load_config(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("rl").setLevel(logging.INFO)
    from rl.loop import run  # heavy imports only once the config is known to be good

    run_dir = config.logging.run_dir or HydraConfig.get().runtime.output_dir
    run(config, run_dir)


if __name__ == "__main__":
    main()
