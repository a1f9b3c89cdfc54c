"""Entry point: compose conf/train.yaml with the command-line overrides and hand the config to bkexp."""

from pathlib import Path

import bkexp  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
import hydra
from omegaconf import DictConfig

from bkexp.train import run

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
