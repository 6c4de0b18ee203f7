"""`python -m rl.train [hydra overrides]`: run the RL job described by conf/config.yaml."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rl.config import Config, ConfigError, load_config

ConfigStore.instance().store(name="tandem_schema", node=Config)


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
