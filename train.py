"""Entry point: compose conf/train.yaml with the command-line overrides and hand the config to bkexp."""

import sys
from pathlib import Path

import bkexp  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
import hydra
from omegaconf import DictConfig

from bkexp.train import run
from bkexp.train.resume import expand_argv

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    return run(cfg)


def main() -> float | None:
    sys.argv = expand_argv(sys.argv)  # resume=<dir> -> the run's own overrides; paths with '=' quoted
    return _main()


if __name__ == "__main__":
    main()
