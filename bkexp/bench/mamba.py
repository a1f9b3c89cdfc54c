"""``bkexp bench mamba``: forward+backward time per token of one Mamba block per selective-scan backend vs N.

Rows (batch 1, d_model 256, d_state 16, expand 2 by default):

- ``block`` / ``cpu``: ``MambaMixer`` with the numba selective scan (what ``backend=auto`` runs on CPU);
- ``block`` / ``ref (sequential PyTorch loop)``: the same block with the one-step-per-position reference
  scan, the baseline the speedups are relative to (only up to ``--loop-max``, it is slow);
- ``block`` / ``cuda``: with ``mamba_ssm``'s kernels, when it imports and a GPU is present;
- ``attention`` / ``sdpa``: a causal ``AttentionMixer`` of the same width, for context;
- ``scan`` / ...: the selective scan alone (same shapes as inside the block), to separate the kernel's
  speedup from the linear layers that both block variants share;
- with ``--verbatim-max N``, block and scan with ``mamba_ssm``'s ``selective_scan_ref`` as written
  (indexing precomputed (b, d, l, n) tensors, whose backward scatters into a full-size zero tensor per
  step, so it is quadratic in N; timed once, no warmup).

The OpenMP wait settings and the load average are in the meta's environment record: on a CPU shared with other
processes, workers that spin between parallel regions (libgomp's default; bkexp sets ``OMP_WAIT_POLICY=PASSIVE``)
take cores the other work needs (``docs/kernels.md``, *CPU runtime*).

Writes ``mamba.json/.csv/.md`` and ``mamba.png`` (time per token vs N) under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bkexp.bench.common import log_log_plot, time_fn, write_table
from bkexp.devices import device_argument
from bkexp.environment import environment
from bkexp.models.mixers.attention import AttentionMixer
from bkexp.models.mixers.mamba import MambaMixer
from bkexp.ops.selective_scan import available_backends, selective_scan

LOOP = "ref (sequential PyTorch loop)"
VERBATIM = "selective_scan_ref verbatim (indexed loop)"
COLUMNS = ["component", "implementation", "n", "fwd_bwd_ms", "min_ms", "us_per_token", "speedup_vs_loop",
           "per_token_vs_smallest_n"]


def selective_scan_ref_verbatim(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                backend=None):
    """``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` for real A and (b, n, l) B/C, as written."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    x = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    out = torch.stack(ys, dim=2)
    out = out if D is None else out + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype_in)


class _VerbatimLoopMamba(MambaMixer):
    """The Mamba block with ``selective_scan_ref`` as written in place of the selective scan."""

    scan = staticmethod(selective_scan_ref_verbatim)


def _block_step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


def _scan_step(scan: Callable[..., torch.Tensor], inputs: dict) -> Callable[[], None]:
    def step() -> None:
        for t in inputs.values():
            if torch.is_tensor(t):
                t.grad = None
        scan(**inputs).sum().backward()
    return step


def _scan_inputs(batch: int, d_inner: int, d_state: int, n: int, device: torch.device) -> dict:
    """Inputs shaped and scaled as inside a freshly initialised Mamba block."""
    g = torch.Generator().manual_seed(0)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).requires_grad_()

    return {
        "u": leaf(torch.randn(batch, d_inner, n, generator=g)),
        "delta": leaf(torch.randn(batch, d_inner, n, generator=g) * 0.1),
        "A": leaf(-torch.arange(1, d_state + 1.0).repeat(d_inner, 1)),
        "B": leaf(torch.randn(batch, d_state, n, generator=g)),
        "C": leaf(torch.randn(batch, d_state, n, generator=g)),
        "D": leaf(torch.ones(d_inner)),
        "z": leaf(torch.randn(batch, d_inner, n, generator=g)),
        "delta_bias": leaf(torch.full((d_inner,), -4.0)),
        "delta_softplus": True,
    }


def _plot(rows: list[dict], path: Path) -> None:
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault((row["component"], row["implementation"]), []).append((row["n"], row["us_per_token"]))
    lines = [(f"{component}: {impl}", [p[0] for p in sorted(points)], [p[1] for p in sorted(points)],
              {"linestyle": "--" if component == "scan" else "-"}) for (component, impl), points in series.items()]
    log_log_plot(path, lines, "sequence length N", "forward + backward time per token (µs)",
                 "Mamba block (d_model 256, d_state 16, expand 2, batch 1)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bkexp bench mamba", description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="512,1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--out", type=Path, default=Path("bench_results/mamba"), help="output directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--loop-max", type=int, default=1024, help="largest N timed with the sequential loop")
    parser.add_argument("--verbatim-max", type=int, default=0,
                        help="largest N timed with selective_scan_ref as written (quadratic backward; 0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per row (median reported)")
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    try:
        lengths = sorted({int(v) for v in args.n.split(",") if v.strip()})
    except ValueError:
        print(f"bkexp bench mamba: --n must be comma-separated integers, got {args.n!r}", file=sys.stderr)
        return 2
    if not lengths or min(lengths) < 1:
        print(f"bkexp bench mamba: --n needs positive lengths, got {args.n!r}", file=sys.stderr)
        return 2
    device = args.device
    backends = [b for b in ("cuda", "cpu") if b in available_backends(device)]
    d_inner = args.expand * args.d_model
    torch.manual_seed(0)

    rows: list[dict] = []
    for n in lengths:
        x = torch.randn(args.batch, n, args.d_model, device=device, requires_grad=True)
        block_impls: dict[str, Callable[[], None]] = {}
        scan_impls: dict[str, Callable[[], None]] = {}
        inputs = _scan_inputs(args.batch, d_inner, args.d_state, n, device)
        for backend in backends:
            block = MambaMixer(args.d_model, d_state=args.d_state, expand=args.expand, backend=backend).to(device)
            block_impls[backend] = _block_step(block, x)
            scan_impls[backend] = _scan_step(partial_scan(backend), inputs)
        if n <= args.loop_max:
            loop_block = MambaMixer(args.d_model, d_state=args.d_state, expand=args.expand, backend="ref").to(device)
            block_impls[LOOP] = _block_step(loop_block, x)
            scan_impls[LOOP] = _scan_step(partial_scan("ref"), inputs)
        if n <= args.verbatim_max:
            verbatim_block = _VerbatimLoopMamba(args.d_model, d_state=args.d_state, expand=args.expand).to(device)
            block_impls[VERBATIM] = _block_step(verbatim_block, x)
            scan_impls[VERBATIM] = _scan_step(selective_scan_ref_verbatim, inputs)
        attention = AttentionMixer(args.d_model, n_heads=4).to(device)
        attention_impls = {"sdpa": _block_step(attention, x)}
        for component, impls in (("block", block_impls), ("scan", scan_impls), ("attention", attention_impls)):
            for impl, step in impls.items():
                once = impl == VERBATIM  # quadratic backward: one untimed-warmup-free run is all it can afford
                timing = time_fn(step, device=device, warmup=0 if once else 1, repeat=1 if once else args.repeat)
                row = {"component": component, "implementation": impl, "n": n,
                       "fwd_bwd_ms": 1e3 * timing["median_s"], "min_ms": 1e3 * timing["min_s"],
                       "us_per_token": 1e6 * timing["median_s"] / (n * args.batch)}
                rows.append(row)
                print(f"  {component:<9} {impl:<44} N={n:<6} {row['fwd_bwd_ms']:10.1f} ms "
                      f"{row['us_per_token']:9.2f} us/token", flush=True)

    # Speedup over the sequential loop of the same component and N; per-token cost relative to the smallest N.
    loop_time = {(r["component"], r["n"]): r["us_per_token"] for r in rows if r["implementation"] == LOOP}
    smallest = {}
    for r in sorted(rows, key=lambda r: r["n"]):
        smallest.setdefault((r["component"], r["implementation"]), r["us_per_token"])
    for r in rows:
        base = loop_time.get((r["component"], r["n"]))
        r["speedup_vs_loop"] = base / r["us_per_token"] if base else None
        r["per_token_vs_smallest_n"] = r["us_per_token"] / smallest[(r["component"], r["implementation"])]

    env = environment()
    try:
        import numba

        env["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    meta = {"benchmark": "mamba", "batch": args.batch, "d_model": args.d_model, "d_state": args.d_state,
            "expand": args.expand, "lengths": lengths, "timing": "median wall time of forward+backward",
            "environment": env}
    md = write_table(rows, COLUMNS, args.out, "mamba", meta)
    _plot(rows, args.out / "mamba.png")
    print(md)
    print(f"wrote {args.out}/mamba.{{json,csv,md,png}}")
    return 0


def partial_scan(backend: str) -> Callable[..., torch.Tensor]:
    def scan(**inputs) -> torch.Tensor:
        return selective_scan(**inputs, backend=backend)
    return scan


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
