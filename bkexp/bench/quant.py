"""``bkexp bench quant``: measured inference speed, weight size and accuracy of real int8 vs bfloat16 weights.

A Transformer LM (the shared backbone with attention + MLP; small by default) is timed in inference mode for
a decode-like input (``--decode-shape``, default 1 x 1 token: memory-bound matrix-vector products, where
weight-only int8 can pay off) and a prefill-like input (``--prefill-shape``, default 4 x 256), as:

- ``float32``: the trained model as is (the reference for the errors);
- ``bfloat16``: every parameter cast to bfloat16 (the baseline real int8 has to beat);
- ``fake-int8 (bkexp)``: bfloat16 plus bkexp's fake quantizer at 8 bits with the training policy: the
  accuracy reference, no speed benefit by design (the int8 grid is stored dequantized);
- ``torchao int8 weight-only``: bfloat16 plus ``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())``
  on the same layers as bkexp's policy (block Linear layers; embedding/head stay bfloat16), when torchao
  imports (``pip install torchao``); real int8 storage and torchao's int8 kernels;
- ``torchao int8 weight-only (fp32 act)``: the same on the float32 model (CPUs without fast bfloat16
  matmuls compare against ``float32``).

torchao's int8 grid is ``-128..127`` with ``scale = max|w| / 127.5`` per row, bkexp's is ``-127..127`` with
``max|w| / 127``, so the two int8 models differ by rounding (``rel_err_vs_fake_int8``), not by scheme.

Columns: median forward time and tokens/s; ``weights_mb``, the size of the serialized state_dict (what the
weights occupy, tensor subclasses included); ``peak_mb``, CUDA peak allocation during the forward (CPU: not
measured); ``rel_err_vs_fp32`` (max-norm relative error of the logits); ``rel_err_vs_fake_int8`` for torchao:
how closely the real int8 path reproduces the fake-quant reference. Writes quant.json/.csv/.md under --out.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bkexp.bench.common import interleaved, write_table
from bkexp.devices import device_argument
from bkexp.environment import environment
from bkexp.models import LanguageModel
from bkexp.models.ffn import MLP
from bkexp.models.mixers import AttentionMixer
from bkexp.ops.testing import rel_err
from bkexp.quant import QuantSpec, policy_targets

COLUMNS = ["shape", "variant", "forward_ms", "min_ms", "tokens_per_s", "speedup_vs_bf16", "speedup_vs_fp32",
           "weights_mb",
           "weights_vs_bf16", "peak_mb", "rel_err_vs_fp32", "rel_err_vs_fake_int8"]


def torchao_status() -> tuple[bool, str]:
    """Whether torchao's int8 weight-only path imports here, and its version or the reason it does not."""
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (not installed, or built for another torch)
        return False, f"{type(exc).__name__}: {exc}"
    return True, torchao.__version__


def build_model(d_model: int, n_layers: int, vocab: int) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(vocab, d_model, n_layers, mixer=partial(AttentionMixer, n_heads=max(1, d_model // 64)),
                         ffn=partial(MLP, expansion=4.0), name="transformer")


def weights_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def variants(base: LanguageModel, device: torch.device, use_torchao: bool) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {"float32": base}
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    out["bfloat16"] = bf16
    fake = copy.deepcopy(bf16)
    spec = QuantSpec(method="ptq", bits=8).validate()
    spec.prepare(fake)
    spec.finalize(fake)
    out["fake-int8 (bkexp)"] = fake
    if use_torchao:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        policy = {t.name for t in policy_targets(bf16, embeddings=False)}
        for name, source in (("torchao int8 weight-only", bf16), ("torchao int8 weight-only (fp32 act)", base)):
            real = copy.deepcopy(source)
            quantize_(real, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in policy)
            out[name] = real
    return {name: model.to(device).eval() for name, model in out.items()}


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bkexp bench quant: {flag} must be BATCHxSEQ (e.g. 4x256), got {text!r}") from None
    if batch < 1 or seq < 1:
        raise SystemExit(f"bkexp bench quant: {flag} needs positive sizes, got {text!r}")
    return batch, seq


def interleaved_times(forwards: dict[str, Any], device: torch.device, repeat: int) -> dict[str, dict[str, float]]:
    """Median/min seconds per variant, the variants timed in turn (see ``interleaved``)."""
    samples = interleaved(forwards, device=device, warmup=2, repeat=repeat)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in samples.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bkexp bench quant", description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--decode-shape", default="1x1", help="BATCHxSEQ of the memory-bound input")
    parser.add_argument("--prefill-shape", default="4x256", help="BATCHxSEQ of the compute-bound input")
    parser.add_argument("--repeat", type=int, default=20, help="timed forwards per row (median reported)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torchao", "none"],
                        help="real int8 backend: auto (torchao when it imports), torchao (required), none")
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=Path("bench_results/quant"), help="output directory")
    args = parser.parse_args(argv)
    device = args.device
    available, ao_info = torchao_status()
    if args.backend == "torchao" and not available:
        print(f"bkexp bench quant: --backend torchao but torchao does not import ({ao_info}); install it with "
              "pip install torchao", file=sys.stderr)
        return 2
    use_torchao = available and args.backend != "none"
    if not use_torchao:
        print(f"  torchao int8 row skipped: {'--backend none' if args.backend == 'none' else ao_info}", flush=True)
    shapes = {"decode " + args.decode_shape: parse_shape(args.decode_shape, "--decode-shape"),
              "prefill " + args.prefill_shape: parse_shape(args.prefill_shape, "--prefill-shape")}

    base = build_model(args.d_model, args.n_layers, args.vocab)
    models = variants(base, device, use_torchao)
    sizes = {name: weights_bytes(model) for name, model in models.items()}
    rows: list[dict[str, Any]] = []
    for label, (batch, seq) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (batch, seq), generator=gen).to(device)
        with torch.inference_mode():
            logits = {name: model(ids).float() for name, model in models.items()}
        peaks: dict[str, float | None] = {}
        forwards = {}
        for name, model in models.items():
            def forward(model: torch.nn.Module = model, ids: torch.Tensor = ids) -> None:
                with torch.inference_mode():
                    model(ids)

            forwards[name] = forward
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
                forward()
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
            else:
                peaks[name] = None
        timings = interleaved_times(forwards, device, args.repeat)
        for name in models:
            median = timings[name]["median_s"]
            rows.append({
                "shape": label, "variant": name, "forward_ms": 1e3 * median, "min_ms": 1e3 * timings[name]["min_s"],
                "tokens_per_s": batch * seq / median,
                "speedup_vs_bf16": timings["bfloat16"]["median_s"] / median,
                "speedup_vs_fp32": timings["float32"]["median_s"] / median,
                "weights_mb": sizes[name] / 2**20, "weights_vs_bf16": sizes[name] / sizes["bfloat16"],
                "peak_mb": peaks[name],
                "rel_err_vs_fp32": float(rel_err(logits[name], logits["float32"])),
                "rel_err_vs_fake_int8": float(rel_err(logits[name], logits["fake-int8 (bkexp)"]))
                if name.startswith("torchao") else None,
            })
            r = rows[-1]
            print(f"  {label:<16} {name:<26} {r['forward_ms']:9.3f} ms  x{r['speedup_vs_bf16']:.2f} vs bf16  "
                  f"{r['weights_mb']:8.2f} MB  err {r['rel_err_vs_fp32']:.2e}", flush=True)
    meta = {"environment": environment(), "torchao": ao_info if available else None,
            "torchao_unavailable_reason": None if available else ao_info,
            "model": {"d_model": args.d_model, "n_layers": args.n_layers, "vocab": args.vocab,
                      "params": base.param_counts()},
            "device": str(device), "repeat": args.repeat,
            "policy": "block Linear layers quantized; embedding and (tied) LM head keep the model's dtype",
            "torchao_config": "Int8WeightOnlyConfig() (per row)" if use_torchao else None}
    md = write_table(rows, COLUMNS, args.out, "quant", meta)
    print(md)
    print(f"[bkexp] bench quant: results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
