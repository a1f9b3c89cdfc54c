"""``bkexp export RUN_DIR --out DIR [--checkpoint best|last|PATH] [--push REPO_ID [--private]]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from bkexp.export.hf import ExportError, export_run, push, upload_operations
    from bkexp.rundir import RunDirError

    parser = argparse.ArgumentParser(prog="bkexp export", description="Write a run as a Hugging Face model folder "
                                     "(model.safetensors, config.json, tokenizer files, README.md model card).")
    parser.add_argument("run_dir", help="the run directory (outputs/<stamp> or a sweep job)")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty unless --overwrite)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--push", metavar="REPO_ID", default=None,
                        help="also upload the folder to this Hugging Face model repository (token: HF_TOKEN or "
                             "`huggingface-cli login`; never written anywhere)")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_run(args.run_dir, args.out, which=args.checkpoint, overwrite=args.overwrite,
                         repo_id=args.push)
        files = [op.path_in_repo for op in upload_operations(out)]
        print(f"exported {args.run_dir} -> {out}: {', '.join(files)}")
        if args.push:
            url = push(out, args.push, private=args.private)
            print(f"pushed to {args.push}: {url}")
    except (ExportError, RunDirError, FileNotFoundError) as err:
        print(f"bkexp export: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
