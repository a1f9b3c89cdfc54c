"""``bkexp generate MODEL --prompt TEXT --max-new-tokens N``: continue a prompt with a trained model.

``MODEL`` is a run directory, a model folder written by ``bkexp export``, or a hub repository id of one
(``--revision``). The model and tokenizer come from :func:`bkexp.infer.run.load_run` (checkpoints loaded with
``weights_only=True``, safetensors strictly); a run trained with quantization generates with its quantized
weights, as it was evaluated. ``--batch N`` draws N continuations of the prompt in one batch (with ``--seed`` they are
reproducible). The continuation (prompt excluded) is printed through the run's tokenizer; ``--json`` prints
prompt ids, continuation ids and text instead. ``--decode-threads`` sets the CPU threads of the token-by-token
steps (``bkexp/threads.py`` says why the default is one).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from bkexp.devices import device_argument
from bkexp.infer.generate import cut_at_until, generate, until_stop
from bkexp.infer.run import load_run
from bkexp.infer.sampling import Sampling
from bkexp.threads import AUTO_STATE_BYTES, DECODE_THREADS, thread_option


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bkexp generate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="MODEL",
                        help="a run directory written by python train.py, a model folder written by bkexp export, "
                             "or a Hugging Face hub repository id of one (owner/name)")
    parser.add_argument("--prompt", required=True, help="text to continue (encoded with the run's tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default 1")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    parser.add_argument("--batch", type=int, default=1, help="continuations of the prompt to draw (one batch)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the output")
    parser.add_argument("--checkpoint", default=None,
                        help="a run directory's checkpoint: best (default), last or a path to a .ckpt")
    parser.add_argument("--revision", default=None, help="hub model: branch, tag or commit (default: main)")
    parser.add_argument("--device", default="cpu", type=device_argument,
                        help="cpu (default), auto (cuda when available), cuda, cuda:1, ...")
    parser.add_argument("--decode-threads", default=DECODE_THREADS,
                        help=f"CPU threads of the token-by-token steps (default {DECODE_THREADS}: one up to "
                             f"{AUTO_STATE_BYTES >> 20} MiB of decoding state, the process's count above; N; 0: the "
                             "process's count); the prompt's prefill always uses the process's count")
    parser.add_argument("--json", action="store_true", help="print JSON (ids and text per continuation)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        decode_threads = thread_option(args.decode_threads, "--decode-threads")
        device = args.device
    except (ValueError, RuntimeError) as err:
        print(f"bkexp generate: {err}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_run(args.run_dir, args.checkpoint, device, args.revision)
        reason = model.decode_unsupported
        if reason is not None:
            raise NotImplementedError(f"the run's model {model.name!r} cannot decode incrementally: {reason}")
        prompt = tokenizer.encode(args.prompt)
    except (ValueError, NotImplementedError) as err:  # RunLoadError is a ValueError
        print(f"bkexp generate: {err}", file=sys.stderr)
        return 2
    if not prompt:
        print(f"bkexp generate: the prompt {args.prompt!r} encodes to no tokens; give some text to continue",
              file=sys.stderr)
        return 2
    outs = generate(model, [prompt] * args.batch, args.max_new_tokens, sampling,
                    stop=until_stop(tokenizer, args.stop), batch_size=args.batch,
                    decode_threads=decode_threads)
    texts = [cut_at_until(tokenizer.decode(ids), args.stop) for ids in outs]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "prompt_ids": prompt,
                          "continuations": [{"ids": ids, "text": text} for ids, text in zip(outs, texts)]}))
    elif args.batch == 1:
        print(texts[0])
    else:
        for i, text in enumerate(texts):
            print(f"--- continuation {i} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
