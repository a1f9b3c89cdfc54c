"""``bkexp bench decode``: prefill and per-token decode cost, and decoding-state memory, per model vs context.

For each model (``model=bk,mamba,transformer`` at one ``size`` preset, so parameter counts are matched as in
training runs), each context length L and each batch size B:

- ``prefill_tok_s``: ``B * L / t`` for ``LanguageModel.prefill`` of a random (B, L) prompt (one timed run
  after a warm-up at the smallest L). Above ``--prefill-max-tokens`` prompt tokens one row is prefilled and
  its state repeated B times (the decode cost does not depend on the tokens) and prefill is left empty;
- ``decode_ms`` / ``decode_min_ms``: the median and the fastest of ``--steps`` timed ``step`` calls (B new
  tokens each) right after that prefill, i.e. at context L, on the CPU threads ``bkexp generate`` would choose
  for ``--decode-threads`` and this state (column ``decode_threads``; the prefill on the process's);
  ``decode_tok_s`` = B / fastest and ``us_per_token`` = fastest / B, which the plot and the crossings use: on
  a shared machine other processes only ever add time, so the fastest step is the steadiest estimate of the
  step's own cost;
- ``state_bytes``: bytes of the decoding state after the prefill (``DecodeState.nbytes``: the KV cache for
  attention, sized for the L + timed steps positions it holds; the pivots for BK; conv window + SSM state
  for Mamba), and ``state_bytes_per_row`` = / B.

The summary (``crossings`` in the JSON, printed) names, per batch size, the first measured L at which
attention's decode step costs more than each recurrent model's, and where its state outgrows theirs.
The models are measured in turn at every (B, L) point, so that load changes hit them alike. Writes
``decode.json/.csv/.md`` and ``decode.png`` (decode time per token vs context, one panel per batch
size) under ``--out``. The meta's environment record holds the OpenMP wait settings and the load average.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from bkexp.bench.common import CONF_DIR, MODELS, build_model, model_list, time_fn, write_table
from bkexp.devices import device_argument
from bkexp.environment import environment
from bkexp.threads import AUTO_STATE_BYTES, DECODE_THREADS, cpu_threads, decode_threads_for, thread_option

COLUMNS = ["model", "batch", "context", "prefill_s", "prefill_tok_s", "decode_ms", "decode_min_ms", "decode_tok_s",
           "us_per_token", "state_bytes", "state_bytes_per_row", "decode_threads", "non_embedding_params"]


def measure(model: torch.nn.Module, batch: int, context: int, steps: int, vocab: int, device: torch.device,
            prefill_max_tokens: int | None = None, seed: int = 0, decode_threads: int | str | None = None) -> dict:
    """One point. Above ``prefill_max_tokens`` prompt tokens (batch * context) the prefill runs on one row and
    its state is repeated ``batch`` times (decode cost does not depend on the tokens); prefill is then not
    reported."""
    gen = torch.Generator().manual_seed(seed)
    replicate = prefill_max_tokens is not None and batch * context > prefill_max_tokens and batch > 1
    ids = torch.randint(0, vocab, (1 if replicate else batch, context), generator=gen).to(device)
    capacity = context + steps + 2  # the cache holds every position the timed steps write
    result: dict = {}

    def prefill() -> None:
        result["state"] = model.prefill(ids, capacity=capacity)[1]

    timing = time_fn(prefill, device=device, warmup=0, repeat=1)
    state = result.pop("state")
    if replicate:
        state = state.index_select(torch.zeros(batch, dtype=torch.long))
    tokens = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    threads = decode_threads_for(decode_threads, state.nbytes()) if device.type == "cpu" else None
    with cpu_threads(threads):  # as bkexp.infer.generate decodes
        step = time_fn(lambda: model.step(tokens, state), device=device, warmup=2, repeat=steps)
    prefill_s = None if replicate else timing["median_s"]
    row = {"batch": batch, "context": context, "prefill_s": prefill_s,
           "prefill_tok_s": None if replicate else batch * context / timing["median_s"],
           "decode_ms": 1e3 * step["median_s"], "decode_min_ms": 1e3 * step["min_s"],
           "decode_tok_s": batch / step["min_s"], "us_per_token": 1e6 * step["min_s"] / batch,
           "state_bytes": state.nbytes(), "state_bytes_per_row": state.nbytes() // batch,
           "decode_threads": threads or torch.get_num_threads()}
    del state
    gc.collect()
    return row


def crossings(rows: list[dict], key: str) -> dict[str, dict[str, int | str]]:
    """Per batch and recurrent model: the first context where attention's ``key`` exceeds the model's."""
    out: dict[str, dict[str, int | str]] = {}
    table = {(r["model"], r["batch"], r["context"]): r[key] for r in rows}
    for batch in sorted({r["batch"] for r in rows}):
        per_model: dict[str, int | str] = {}
        for other in sorted({r["model"] for r in rows} - {"transformer"}):
            contexts = sorted(c for (m, b, c) in table if m == other and b == batch
                              and ("transformer", b, c) in table)
            if not contexts:
                continue
            above = [table[("transformer", batch, c)] > table[(other, batch, c)] for c in contexts]
            if not above[-1]:
                per_model[other] = f"attention not above {other} at the largest measured context {contexts[-1]}"
            elif all(above):
                per_model[other] = f"attention above {other} from {contexts[0]} (every measured length)"
            else:  # the first length from which attention stays above
                per_model[other] = contexts[max(i for i, a in enumerate(above) if not a) + 1]
        out[f"batch {batch}"] = per_model
    return out


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model in MODELS:
            points = sorted((r["context"], r["us_per_token"]) for r in rows if r["model"] == model
                            and r["batch"] == batch)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens already in the state)")
        ax.set_ylabel("decode time per token (µs)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"bkexp bench decode: {what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"bkexp bench decode: {what} needs positive integers, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bkexp bench decode", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=model_list, default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--size", default="small", help="size preset (conf/size): tiny, small, medium")
    parser.add_argument("--context", default="256,512,1024,2048,4096,8192,16384",
                        help="comma-separated context lengths")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prefill-max-tokens", type=int, default=32768,
                        help="above this many prompt tokens (batch x context) one row is prefilled and its state "
                             "repeated for the batch; prefill is then not timed (0: always prefill the batch)")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per point (median and fastest reported)")
    parser.add_argument("--decode-threads", default=DECODE_THREADS,
                        help=f"CPU threads of the timed steps, chosen as bkexp generate chooses them (default "
                             f"{DECODE_THREADS}: one up to {AUTO_STATE_BYTES >> 20} MiB of decoding state, the "
                             "process's count above; N; 0: the process's count); the prefill uses the process's count")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size of the random-token models")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--config-dir", type=Path, default=CONF_DIR, help="bkexp's conf/ tree")
    parser.add_argument("--out", type=Path, default=Path("bench_results/decode"), help="output directory")
    args = parser.parse_args(argv)
    models = args.models
    sizes = sorted(p.stem for p in args.config_dir.glob("size/*.yaml"))
    if args.size not in sizes:
        print(f"bkexp bench decode: unknown size {args.size!r}; valid: {', '.join(sizes)}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"bkexp bench decode: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    try:
        decode_threads = thread_option(args.decode_threads, "--decode-threads")
    except ValueError as err:
        print(f"bkexp bench decode: {err}", file=sys.stderr)
        return 2
    contexts, batches = _ints(args.context, "--context"), _ints(args.batch, "--batch")
    device = args.device
    dtype = getattr(torch, args.dtype)

    rows: list[dict] = []
    params: dict[str, int] = {}
    built: dict[str, torch.nn.Module] = {}
    for name in models:
        torch.manual_seed(0)
        built[name] = build_model(name, args.size, args.vocab, args.config_dir).to(device=device, dtype=dtype).eval()
        params[name] = built[name].param_counts()["non_embedding"]
    with torch.inference_mode():
        for model in built.values():
            measure(model, batches[0], contexts[0], 2, args.vocab, device,  # warm-up: kernels compile, caches fill
                    decode_threads=decode_threads)
        # Models interleaved at every point, so load changes on a shared machine hit them alike.
        for batch in batches:
            for context in contexts:
                for name, model in built.items():
                    try:
                        row = measure(model, batch, context, args.steps, args.vocab, device,
                                      args.prefill_max_tokens or None, decode_threads=decode_threads)
                    except torch.OutOfMemoryError:
                        print(f"  {name:<12} batch {batch:<3} context {context:<6} out of memory: skipped", flush=True)
                        continue
                    row = {"model": name, **row, "non_embedding_params": params[name]}
                    rows.append(row)
                    prefill = "  (1 row)" if row["prefill_tok_s"] is None else f"{row['prefill_tok_s']:10.0f}"
                    print(f"  {name:<12} batch {batch:<3} context {context:<6} prefill {prefill} "
                          f"tok/s  decode {row['decode_tok_s']:9.1f} tok/s ({row['us_per_token']:9.1f} us/token)  "
                          f"state {row['state_bytes']:>12,d} B", flush=True)

    summary = {"decode_time": crossings(rows, "us_per_token"), "state_bytes": crossings(rows, "state_bytes")}
    env = environment()
    meta = {"benchmark": "decode", "size": args.size, "vocab": args.vocab, "dtype": args.dtype,
            "contexts": contexts, "batches": batches, "steps": args.steps,
            "decode_threads": decode_threads or torch.get_num_threads(),  # the setting; each row: its count
            "prefill_max_tokens": args.prefill_max_tokens, "non_embedding_params": params,
            "timing": "prefill: one run after a warm-up; decode: median (decode_ms) and fastest (decode_min_ms, "
                      "used for decode_tok_s, us_per_token, the plot and the crossings) of --steps single-token "
                      "steps at the given context; models interleaved per point", "crossings": summary, "environment": env}
    md = write_table(rows, COLUMNS, args.out, "decode", meta)
    _plot(rows, args.out / "decode.png",
          f"decode cost vs context ({args.size} size, {args.dtype}, {env['device']}, "
          f"decode threads {meta['decode_threads']}, {env['threads']} prefill threads)")
    print(md)
    for what, per_batch in summary.items():
        for batch, per_model in per_batch.items():
            for other, where in per_model.items():
                text = where if isinstance(where, str) else f"attention above {other} from context {where}"
                print(f"{what} ({batch}): {text}")
    print(f"wrote {args.out}/decode.{{json,csv,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
