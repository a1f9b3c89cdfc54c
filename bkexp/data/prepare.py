"""``bkexp prepare-data dataset=c4 tokenizer=gpt2 [overrides] [--splits ...] [--max-tokens N]``: tokenise once.

The arguments are the same Hydra overrides as ``python train.py`` (so the cache matches what a run with those
overrides reads); each split is streamed through the tokenizer into a token cache (:mod:`bkexp.data.token_cache`)
under ``dataset.token_cache``. Later runs with the same source, split and tokenizer read the cache instead of
streaming, on any number of ranks and nodes. An interrupted preparation continues where it stopped when the same
command is run again; a larger ``--max-tokens`` extends a truncated cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import bkexp

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The conf/ tree beside the package (a source checkout or an editable install)."""
    return Path(bkexp.__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str], conf: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (conf / "train.yaml").is_file():
        raise FileNotFoundError(f"no conf/train.yaml in {conf}; pass --config-dir to the project's conf/ folder")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bkexp prepare-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=c4 tokenizer=gpt2")
    parser.add_argument("--splits", default="train,validation,test",
                        help="comma-separated splits to prepare (default: all three)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop each split at the first shard boundary past this many tokens")
    parser.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 16M)")
    parser.add_argument("--config-dir", type=Path, default=None, help="the conf/ folder (default: the project's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hydra.utils import instantiate

    from bkexp.data.sources import SPLITS
    from bkexp.data.streaming import StreamingTextDataModule
    from bkexp.data.token_cache import DEFAULT_SHARD_TOKENS, tokenizer_fingerprint, write_cache

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        print(f"bkexp prepare-data: unknown split(s) {bad}; valid: {list(SPLITS)}", file=sys.stderr)
        return 2
    for name, value in (("--max-tokens", args.max_tokens), ("--shard-tokens", args.shard_tokens)):
        if value is not None and value < 1:
            print(f"bkexp prepare-data: {name} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    cfg = compose(list(args.overrides), args.config_dir or config_dir())
    datamodule = instantiate(cfg.dataset)
    if not isinstance(datamodule, StreamingTextDataModule):
        print(f"bkexp prepare-data: dataset={cfg.dataset.name} is read in memory ({type(datamodule).__name__}); "
              "token caches are for streamed datasets: dataset=c4, dataset=pile, or dataset=text over "
              "json/jsonl/parquet files (or with dataset.streaming=true)", file=sys.stderr)
        return 2
    if datamodule.token_cache is None:
        print("bkexp prepare-data: dataset.token_cache is null; set it to the folder the cache should go to",
              file=sys.stderr)
        return 2
    try:
        for split in splits:
            datamodule.source.check_reachable(split)  # before any split is written
    except RuntimeError as err:
        print(f"bkexp prepare-data: {err}", file=sys.stderr)
        return 2
    rows = []
    for split in splits:
        directory = datamodule.cache_dir(split)
        started = time.perf_counter()
        meta = write_cache(
            directory, datamodule.source.open(split), datamodule.tokenizer, datamodule.text_field,
            describe={"dataset": datamodule.name, "split": split, "source": datamodule.source.describe(),
                      "tokenizer": tokenizer_fingerprint(datamodule.tokenizer)},
            shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, max_tokens=args.max_tokens,
            docs_per_batch=datamodule.docs_per_batch)
        rows.append((split, meta["num_tokens"], meta["documents"], len(meta["shards"]),
                     "yes" if meta["exhausted"] else "no", time.perf_counter() - started, directory))
    print(f"{'split':<11} {'tokens':>13} {'documents':>10} {'shards':>6} {'whole':>5} {'seconds':>8}  cache")
    for split, tokens, docs, shards, whole, seconds, directory in rows:
        print(f"{split:<11} {tokens:>13,} {docs:>10,} {shards:>6} {whole:>5} {seconds:>8.1f}  {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
