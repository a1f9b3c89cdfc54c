"""``bkexp bench bk-core``: time per token of every BK-Core backend and of causal SDPA, forward and fwd+bwd.

BK inputs and output gradients are timed in each of ``--layouts``: ``planes`` is a mixer's layout (``v`` the
(B, H, N) transpose of a contiguous position-major (B, N, H) tensor), ``rows`` plain contiguous (B, H, N) rows;
``IN/GRAD`` names the inputs' and the output gradients' layouts; with several, the fwd+bwd of the layouts of one
backend, mode and N are timed in turn, so their ratios (``vs_best_layout``) see the same load. Every row reports
the bandwidth its fwd+bwd
reaches on the least traffic (``MIN_BYTES_PER_ELEMENT``) and, as a fraction, against this process's own copy
bandwidth (``copy_gbs``: a large tensor copied into a preallocated one, timed alongside).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bkexp.bench.common import interleaved, log_log_plot, time_fn, write_table
from bkexp.environment import environment
from bkexp.ops.bk_core import available_backends, bk_core
from bkexp.ops.testing import as_real, rel_err

DEFAULT_N = "256,512,1024,2048,4096,8192,16384"
LAYOUTS = ("planes/planes", "rows/rows", "planes/rows", "rows/planes")  # inputs/output-gradient layouts
HEAD_DIM = 64
# Least memory traffic of forward + backward per element: read v, write y (re, im); read v and dL/dy (re, im),
# write dL/dv -- 4 + 8 + 4 + 8 + 4 bytes in float32 (docs/bk_core.md; the roofline of docs/kernels.md).
MIN_BYTES_PER_ELEMENT = 28
# Peak DRAM bandwidth (GB/s) by device-name fragment, first match wins; --peak-gbs overrides.
KNOWN_PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                  ("A100", 1555.0), ("L40S", 864.0), ("A10", 600.0))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bkexp bench bk-core", description=__doc__)
    p.add_argument("--n", default=DEFAULT_N, help=f"sequence lengths, comma separated (default {DEFAULT_N})")
    p.add_argument("--channels", type=int, default=256,
                   help="rows per token: BK rows = batch*heads; SDPA heads*64 (default 256)")
    p.add_argument("--batch", type=int, default=4, help="BK batch; heads = channels / batch (default 4)")
    p.add_argument("--backends", default=None,
                   help="comma separated BK backends (default: every available one except reference) "
                        "plus 'sdpa' for causal scaled_dot_product_attention")
    p.add_argument("--mode", default="causal", choices=["causal", "bidirectional", "both"])
    p.add_argument("--layouts", default="planes/planes,rows/rows",
                   help="IN/GRAD memory layouts of the BK inputs and output gradients, comma separated, from "
                        f"{', '.join(LAYOUTS)} (default planes/planes,rows/rows; the roofline case times all four)")
    p.add_argument("--torch-max-n", type=int, default=16384,
                   help="largest N for the python-loop backends torch / torch_autograd (default 16384)")
    p.add_argument("--sdpa-max-n", type=int, default=8192,
                   help="largest N for SDPA, whose cost grows as N^2 (default 8192)")
    p.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: torch's")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per configuration (median reported)")
    p.add_argument("--out", type=Path, default=Path("bench_results/bk-core"))
    p.add_argument("--quick", action="store_true", help="N up to 1024, 2 repeats: a smoke run")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the roofline case (--roofline-rows rows at N=--roofline-n, fwd+bwd) and "
                        "report the bandwidth it reaches (default: on for CUDA)")
    p.add_argument("--roofline-rows", type=int, default=8 * 256, help="rows of the roofline case (default 8*256)")
    p.add_argument("--roofline-batch", type=int, default=8, help="batch of the roofline case (default 8)")
    p.add_argument("--roofline-n", type=int, default=8192, help="N of the roofline case (default 8192)")
    p.add_argument("--accuracy", action="store_true",
                   help="also write accuracy.{json,csv,md}: max relative error of each backend's outputs and "
                        "gradients (float32 inputs) against the float64 dense reference, both modes")
    p.add_argument("--accuracy-n", default="64,256",
                   help="sequence lengths of the accuracy table (default 64,256; the dense reference's gradient "
                        "keeps O(N^3) memory: about 1.7 GB at N=256, 14 GB at N=512)")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="peak memory bandwidth in GB/s for the roofline fraction (default: known GPUs by name)")
    args = p.parse_args(argv)
    if args.channels % args.batch:
        p.error(f"--channels {args.channels} must be divisible by --batch {args.batch}")
    if args.channels % HEAD_DIM:
        p.error(f"--channels {args.channels} must be a multiple of the SDPA head size {HEAD_DIM}")
    args.layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in args.layouts if x not in LAYOUTS]
    if bad or not args.layouts:
        p.error(f"--layouts {bad or args.layouts!r}: valid are {', '.join(LAYOUTS)}")
    if args.roofline_rows % args.roofline_batch:
        p.error(f"--roofline-rows {args.roofline_rows} must be divisible by --roofline-batch {args.roofline_batch}")
    return args


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, L) ``t`` as contiguous rows, or as the transpose of contiguous (B, L, H) planes."""
    return t.contiguous() if layout == "rows" else t.transpose(1, 2).contiguous().transpose(1, 2)


def _bk_case(backend: str, n: int, batch: int, heads: int, causal: bool, device: torch.device,
             layout: str = "planes/planes"):
    """fwd and fwd+bwd closures; inputs and output gradients laid out as ``layout`` (IN/GRAD) says."""
    lin, lgrad = layout.split("/")
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(batch, n, heads, generator=gen).transpose(1, 2)
    k = F.softplus(torch.randn(batch, n - 1, heads, generator=gen)).transpose(1, 2)
    v, k = (_in_layout(t.to(device), lin).requires_grad_() for t in (v, k))
    z = torch.complex(0.5 * torch.randn(batch, heads, generator=gen),
                      0.05 + torch.rand(batch, heads, generator=gen)).to(device).requires_grad_()
    g_re, g_im = (_in_layout(torch.randn(batch, n, heads, generator=gen).to(device).transpose(1, 2), lgrad)
                  for _ in range(2))

    def fwd():
        with torch.no_grad():
            return bk_core(v, k, z, causal=causal, backend=backend)

    def fwd_bwd():
        re, im = bk_core(v, k, z, causal=causal, backend=backend)
        return torch.autograd.grad((re, im), (v, k, z), (g_re, g_im))

    return fwd, fwd_bwd


def _interleaved_layouts(backend: str, n: int, batch: int, heads: int, causal: bool, device: torch.device,
                         layouts: list[str], repeat: int, min_time_s: float = 0.2) -> dict[str, dict[str, float]]:
    """fwd+bwd of each layout timed in turn (``interleaved``), at least ``repeat`` rounds and about
    ``min_time_s`` per layout (at most 10x ``repeat`` rounds): {layout: {"median_s", "n"}}."""
    cases = {layout: _bk_case(backend, n, batch, heads, causal, device, layout)[1] for layout in layouts}
    once = interleaved(cases, device=device, warmup=1, repeat=1)
    rounds = min(10 * repeat, max(repeat, math.ceil(min_time_s / max(min(min(t) for t in once.values()), 1e-9))))
    times = interleaved(cases, device=device, warmup=0, repeat=rounds)
    return {layout: {"median_s": statistics.median(ts), "n": len(ts)} for layout, ts in times.items()}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second, in GB/s) of ``nbytes`` into a preallocated tensor."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=1, repeat=repeat)
    return 2 * nbytes / t["median_s"] / 1e9


def _sdpa_case(n: int, heads: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, generator=gen).to(device).requires_grad_() for _ in range(3))
    g = torch.randn(1, heads, n, HEAD_DIM, generator=gen).to(device)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), g)

    return fwd, fwd_bwd


def _copy_case(elements: int, device: torch.device):
    """Copy of four float32 planes of ``elements`` into preallocated ones: the copy bandwidth at the case's size."""
    src = torch.ones(4, elements, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    return lambda: dst.copy_(src)


def peak_bandwidth_gbs(device: torch.device, override: float | None = None) -> float | None:
    """Peak memory bandwidth of ``device`` in GB/s: ``override``, else a known GPU's by name, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for fragment, gbs in KNOWN_PEAK_GBS if fragment in name), None)


def roofline_row(backend: str, rows: int, n: int, fwd_bwd_s: float, peak_gbs: float | None,
                 copy_gbs: float | None = None, layout: str = "planes/planes") -> dict[str, Any]:
    """Bandwidth reached by one fwd+bwd call over ``rows`` x ``n`` elements, against the 28-byte floor."""
    moved = MIN_BYTES_PER_ELEMENT * rows * n
    floor_ms = moved / (peak_gbs * 1e9) * 1e3 if peak_gbs else None
    achieved = moved / fwd_bwd_s / 1e9
    return {
        "backend": backend, "layout": layout, "rows": rows, "n": n, "fwd_bwd_ms": fwd_bwd_s * 1e3,
        "min_bytes": moved, "achieved_gbs": achieved, "copy_gbs": copy_gbs,
        "copy_fraction": achieved / copy_gbs if copy_gbs else None, "peak_gbs": peak_gbs,
        "floor_ms": floor_ms,
        "bandwidth_fraction": achieved / peak_gbs if peak_gbs else None,
        "times_floor": fwd_bwd_s * 1e3 / floor_ms if floor_ms else None,
    }


def accuracy_rows(backends: list[str], ns: list[int], device: torch.device) -> list[dict[str, Any]]:
    """Max relative error (max-norm) of y and of dL/dv, dL/dk, dL/dz against float64 dense autograd.

    Inputs as in the op tests: float32, 2 x 4 rows laid out as a mixer's (B, N, H) view, v ~ N(0, 1),
    k ~ U(0, 1.5), one z per row with Im(z) in [0.05, 1.05]; a random weighted loss of Re y and Im y.
    """
    out = []
    for n in ns:
        gen = torch.Generator().manual_seed(n)
        v = torch.randn(2, n, 4, generator=gen, dtype=torch.float64).transpose(1, 2)
        k = 1.5 * torch.rand(2, 4, n - 1, generator=gen, dtype=torch.float64)
        z = torch.complex(0.5 * torch.randn(2, 4, generator=gen, dtype=torch.float64),
                          0.05 + torch.rand(2, 4, generator=gen, dtype=torch.float64))
        w = torch.randn(2, 2, 4, n, generator=gen, dtype=torch.float64)
        for causal in (True, False):
            case = (v, k, z, w, causal, device)
            expected = _y_and_grads("reference", *case, torch.float64)
            for backend in backends:
                got = _y_and_grads(backend, *case, torch.float32)
                errs = [rel_err(as_real(a), as_real(e)) for a, e in zip(got, expected)]
                out.append({"backend": backend, "mode": "causal" if causal else "bidirectional", "n": n,
                            "y": max(errs[:2]), "grad_v": errs[2], "grad_k": errs[3], "grad_z": errs[4]})
    return out


def _y_and_grads(backend: str, v: torch.Tensor, k: torch.Tensor, z: torch.Tensor, w: torch.Tensor, causal: bool,
                 device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Re y, Im y and the gradients of a weighted loss for v, k, z, computed with inputs cast to ``dtype``."""
    ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
    vv, kk = (t.to(device=device, dtype=dtype).requires_grad_() for t in (v, k))
    zz = z.to(device=device, dtype=ctype).requires_grad_()
    re, im = bk_core(vv, kk, zz, causal=causal, backend=backend)
    w = w.to(device)
    loss = (re.double() * w[0]).sum() + (im.double() * w[1]).sum()
    return [t.detach().cpu() for t in (re, im, *torch.autograd.grad(loss, (vv, kk, zz)))]


def _plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["backend"], r["mode"], r["layout"]), []).append(r)
    timing, speedup = [], []
    for color, ((backend, mode, layout), rs) in enumerate(sorted(series.items())):
        rs = sorted(rs, key=lambda r: r["n"])
        style = {"color": f"C{color % 10}"}
        name = f"{backend} ({mode}{'' if layout == '-' else ', ' + layout})"
        timing.append((f"{name} fwd+bwd", [r["n"] for r in rs], [r["fwd_bwd_us_per_token"] for r in rs], style))
        timing.append((f"{name} fwd", [r["n"] for r in rs], [r["fwd_us_per_token"] for r in rs],
                       {**style, "marker": ".", "linestyle": "--", "alpha": 0.7}))
        fast = [r for r in rs if r.get("speedup_vs_torch_fwd_bwd")]
        if fast:
            speedup.append((name, [r["n"] for r in fast], [r["speedup_vs_torch_fwd_bwd"] for r in fast], style))
    plots = [log_log_plot(out_dir / "time_per_token.png", timing, "sequence length N", "µs per token (all channels)",
                          "BK-Core and causal SDPA: time per token")]
    if speedup:  # only when the torch backend was timed beside another one (an empty plot says nothing)
        plots.append(log_log_plot(out_dir / "speedup_vs_torch.png", speedup, "sequence length N",
                                  "speedup over the torch backend (fwd+bwd)",
                                  "Speedup over the pure-PyTorch BK-Core backend"))
    return plots


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns = [int(x) for x in args.n.split(",")]
    repeat = args.repeat
    if args.quick:
        ns = [n for n in ns if n <= 1024] or [256]
        repeat = 2
    avail = [b for b in available_backends(device) if b != "reference"]
    wanted = args.backends.split(",") if args.backends else avail + ["sdpa"]
    unknown = [b for b in wanted if b not in avail and b != "sdpa"]
    if unknown:
        print(f"bkexp bench bk-core: backends {unknown} unavailable on {device}; available: {', '.join(avail)}, sdpa")
        return 2
    modes = {"causal": [True], "bidirectional": [False], "both": [True, False]}[args.mode]
    heads = args.channels // args.batch

    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (read + write)", flush=True)
    rows: list[dict[str, Any]] = []
    layout_times: dict[tuple[str, bool, int], dict[str, dict[str, float]]] = {}
    for n in ns:
        for backend in wanted:
            for causal, layout in ([(c, lay) for c in modes for lay in args.layouts] if backend != "sdpa"
                                   else [(True, "-")]):
                if backend in ("torch", "torch_autograd") and n > args.torch_max_n:
                    continue
                if backend == "sdpa" and n > args.sdpa_max_n:
                    continue
                if backend == "sdpa":
                    fwd, fwd_bwd = _sdpa_case(n, args.channels // HEAD_DIM, device)
                else:
                    fwd, fwd_bwd = _bk_case(backend, n, args.batch, heads, causal, device, layout)
                slow = backend in ("torch", "torch_autograd", "sdpa") and n >= 4096
                reps = 1 if slow else repeat
                t_f = time_fn(fwd, device=device, warmup=1, repeat=reps, min_time_s=0.0 if slow else 0.2)
                if backend != "sdpa" and len(args.layouts) > 1 and not slow:
                    # fwd+bwd of every layout of this backend, mode and N timed in turn: their ratios
                    # (vs_best_layout) see the same load
                    key = (backend, causal, n)
                    if key not in layout_times:
                        layout_times[key] = _interleaved_layouts(backend, n, args.batch, heads, causal, device,
                                                                 args.layouts, reps)
                    t_fb = layout_times[key][layout]
                else:
                    t_fb = time_fn(fwd_bwd, device=device, warmup=1, repeat=reps, min_time_s=0.0 if slow else 0.2)
                gbs = MIN_BYTES_PER_ELEMENT * args.channels * n / t_fb["median_s"] / 1e9
                row = {
                    "backend": backend,
                    "mode": "causal" if causal else "bidirectional",
                    "layout": layout,
                    "n": n,
                    "channels": args.channels,
                    "fwd_us_per_token": t_f["median_s"] / n * 1e6,
                    "fwd_bwd_us_per_token": t_fb["median_s"] / n * 1e6,
                    "fwd_ms": t_f["median_s"] * 1e3,
                    "fwd_bwd_ms": t_fb["median_s"] * 1e3,
                    "runs": t_fb["n"],
                    "gbs": None if backend == "sdpa" else gbs,
                    "copy_fraction": None if backend == "sdpa" else gbs / copy_gbs,
                }
                rows.append(row)
                print(f"{backend:>15} {row['mode']:>13} {layout:>13} N={n:<6} fwd {row['fwd_us_per_token']:9.3f} "
                      f"µs/tok   fwd+bwd {row['fwd_bwd_us_per_token']:9.3f} µs/tok", flush=True)
    torch_times = {(r["mode"], r["n"], r["layout"]): r["fwd_bwd_us_per_token"] for r in rows if r["backend"] == "torch"}
    best = {}  # the fastest layout of each backend, mode and N
    for r in rows:
        key = (r["backend"], r["mode"], r["n"])
        best[key] = min(best.get(key, math.inf), r["fwd_bwd_us_per_token"])
    for r in rows:
        base = torch_times.get((r["mode"], r["n"], r["layout"]))
        r["speedup_vs_torch_fwd_bwd"] = base / r["fwd_bwd_us_per_token"] if base else None
        r["vs_best_layout"] = r["fwd_bwd_us_per_token"] / best[(r["backend"], r["mode"], r["n"])]

    meta = {
        "environment": environment(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "heads": heads,
        "sdpa_heads": args.channels // HEAD_DIM,
        "sdpa_head_dim": HEAD_DIM,
        "layout": "BK inputs and output gradients per row's layout (IN/GRAD): planes = (B, N, H) viewed as "
                  "(B, H, N), rows = contiguous (B, H, N); SDPA (1, heads, N, 64), is_causal=True",
        "copy_gbs": copy_gbs,
        "min_bytes_per_element": MIN_BYTES_PER_ELEMENT,
        "note": "median wall time per call divided by N; fwd under no_grad; fwd+bwd = forward + autograd.grad",
    }
    try:
        import numba

        meta["numba_threads"] = numba.get_num_threads()
        meta["numba_threading_layer"] = numba.config.THREADING_LAYER
    except ImportError:
        pass
    columns = ["backend", "mode", "layout", "n", "channels", "fwd_us_per_token", "fwd_bwd_us_per_token", "fwd_ms",
               "fwd_bwd_ms", "gbs", "copy_fraction", "vs_best_layout", "speedup_vs_torch_fwd_bwd", "runs"]
    md = write_table(rows, columns, args.out, "bk_core", meta)
    plots = _plots(rows, args.out)
    print()
    print(md)
    written = [f"{args.out}/bk_core.{{json,csv,md}}", *(p.name for p in plots)]
    roofline = device.type == "cuda" if args.roofline is None else args.roofline
    if roofline:
        peak = peak_bandwidth_gbs(device, args.peak_gbs)
        roof = []
        for backend in [b for b in wanted if b not in ("sdpa", "torch", "torch_autograd")]:
            cases = {layout: _bk_case(backend, args.roofline_n, args.roofline_batch,
                                      args.roofline_rows // args.roofline_batch, True, device, layout)[1]
                     for layout in LAYOUTS}
            cases["copy"] = _copy_case(args.roofline_rows * args.roofline_n, device)
            # the layouts and the copy timed in turn, so a change of load hits them alike
            times = {name: statistics.median(ts)
                     for name, ts in interleaved(cases, device=device, repeat=repeat).items()}
            copy_s = times.pop("copy")
            roof_copy_gbs = 2 * 4 * args.roofline_rows * args.roofline_n * 4 / copy_s / 1e9
            fastest = min(times.values())
            for layout, t in times.items():
                roof.append({**roofline_row(backend, args.roofline_rows, args.roofline_n, t, peak, roof_copy_gbs,
                                            layout), "vs_best_layout": t / fastest})
        roof_md = write_table(roof, list(roof[0]) if roof else ["backend"], args.out, "roofline",
                              {**meta, "min_bytes_per_element": MIN_BYTES_PER_ELEMENT, "mode": "causal"})
        print(f"\nroofline: causal fwd+bwd, {args.roofline_rows} rows x N={args.roofline_n}, "
              f"{MIN_BYTES_PER_ELEMENT} bytes/element at least; peak {peak or 'unknown'} GB/s; copy_gbs: four "
              f"planes of the case copied, timed interleaved with the layouts\n{roof_md}")
        written.append("roofline.{json,csv,md}")
    if args.accuracy:
        acc = accuracy_rows([b for b in wanted if b != "sdpa"], [int(x) for x in args.accuracy_n.split(",")], device)
        acc_md = write_table(acc, ["backend", "mode", "n", "y", "grad_v", "grad_k", "grad_z"], args.out, "accuracy",
                             {**meta, "note": "max relative error vs float64 dense autograd, float32 inputs"})
        print(f"\naccuracy: max relative error against the float64 dense reference\n{acc_md}")
        written.append("accuracy.{json,csv,md}")
    print(f"\nthreads={meta['threads']} device={device}; wrote " + ", ".join(written))
    return 0 if all(math.isfinite(r["fwd_bwd_us_per_token"]) for r in rows) else 1
