"""Score a token stream with a causal LM at a given context length: the one loop every perplexity in bkexp/eval uses.

A stream of ``T`` tokens has ``T - 1`` next-token targets (target ``j`` is ``stream[j + 1]`` predicted from
``stream[: j + 1]``). :func:`plan_windows` decides which window of inputs scores which targets:

* non-overlapping (``stride=None``): windows ``[kL, kL + L)``, each scoring all of its positions, so a target
  at window position ``p`` sees ``p + 1`` tokens of context (the way training chunks the stream);
* sliding (``stride=S``): each window ends ``S`` targets after the previous one and scores only those new
  targets, so every target but the first ``L`` sees at least ``L - S + 1`` tokens of context.

Either way every target in ``[0, n_targets)`` is scored exactly once (checked at run time), so the scores at
different ``L`` cover exactly the same tokens when ``n_targets`` is the same. Losses are the training code's
(float32 cross-entropy of the logits, as :meth:`bkexp.train.module.LMTask.token_losses`) summed in float64.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkexp.memory import peak_memory_mb, reset_peak_memory, resident_memory_mb

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Window:
    """Inputs ``stream[start:end]`` predict targets ``start .. end-1``; targets ``score_from .. end-1`` count."""

    start: int
    end: int
    score_from: int


def plan_windows(n_targets: int, length: int, stride: int | None = None) -> list[Window]:
    """Windows of at most ``length`` inputs that score each of the ``n_targets`` targets exactly once."""
    if n_targets < 1:
        raise ValueError(f"nothing to score: n_targets={n_targets}")
    if length < 1:
        raise ValueError(f"context length must be >= 1, got {length}")
    if stride is None:
        return [Window(s, min(s + length, n_targets), s) for s in range(0, n_targets, length)]
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be in [1, length={length}], got {stride}")
    windows = [Window(0, min(length, n_targets), 0)]
    while windows[-1].end < n_targets:
        end = min(windows[-1].end + stride, n_targets)
        windows.append(Window(max(0, end - length), end, windows[-1].end))
    return windows


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


@dataclass
class StreamScore:
    """What scoring a stream at one context length measured."""

    length: int
    stride: int | None
    targets: int
    status: str = "ok"  # ok | oom
    error: str | None = None
    loss_sum: float = 0.0
    windows: int = 0
    input_tokens: int = 0
    seconds: float = 0.0  # forward + loss time of the timed batches (all but the first when there are several)
    timed_targets: int = 0
    peak_mb: float | None = None
    start_rss_mb: float | None = None
    position_loss_sum: Tensor | None = field(default=None, repr=False)  # (length,) float64, by window position
    position_count: Tensor | None = field(default=None, repr=False)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.targets if self.status == "ok" else math.nan

    @property
    def ppl(self) -> float:
        loss = self.loss
        return math.exp(loss) if loss < 700 else math.inf

    @property
    def tokens_per_sec(self) -> float | None:
        return self.timed_targets / self.seconds if self.seconds > 0 else None

    def loss_by_position(self) -> list[dict[str, Any]]:
        """Mean loss over window positions in log2 bins [0], [1], [2, 3], [4, 7], ... (context = position + 1)."""
        if self.position_loss_sum is None:
            return []
        bins: list[dict[str, Any]] = []
        lo = 0
        while lo < self.length:
            hi = min(2 * lo if lo else 1, self.length)
            count = float(self.position_count[lo:hi].sum())
            if count:
                bins.append({"first": lo, "last": hi - 1, "targets": int(count),
                             "loss": float(self.position_loss_sum[lo:hi].sum()) / count})
            lo = hi
        return bins

    def to_dict(self) -> dict[str, Any]:
        return {"length": self.length, "stride": self.stride, "status": self.status, "error": self.error,
                "targets": self.targets, "loss": self.loss, "ppl": self.ppl, "windows": self.windows,
                "input_tokens": self.input_tokens, "tokens_per_sec": self.tokens_per_sec,
                "peak_mb": self.peak_mb, "start_rss_mb": self.start_rss_mb,
                "loss_by_position": self.loss_by_position()}


def token_losses(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    """Per-position cross-entropy exactly as training computes it (0 where the label is ignored)."""
    logits = model(input_ids)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def score_stream(model: nn.Module, stream: Tensor, length: int, *, stride: int | None = None,
                 n_targets: int | None = None, batch_size: int | None = None, batch_tokens: int = 16384,
                 pad_id: int = 0, device: torch.device | str = "cpu", measure_memory: bool = True) -> StreamScore:
    """Score the first ``n_targets`` targets of ``stream`` (default: all) with windows of ``length`` inputs.

    Every window is padded to ``length`` inputs (``pad_id``; padded positions carry no label), so a stream
    scored at the training ``seq_len`` with the training ``eval_batch_size`` gives the model exactly the
    batches ``trainer.test`` gave it. ``batch_size`` windows per forward (default: ``batch_tokens // length``,
    at least one). Running out of memory returns ``status="oom"`` instead of raising.
    """
    device = torch.device(device)
    stream = stream.to(torch.long).flatten()
    available = stream.numel() - 1
    n_targets = available if n_targets is None else n_targets
    if not 1 <= n_targets <= available:
        raise ValueError(f"n_targets={n_targets} but the stream of {stream.numel()} tokens has {available} targets")
    windows = plan_windows(n_targets, length, stride)
    batch_size = batch_size or max(1, batch_tokens // length)
    result = StreamScore(length=length, stride=stride, targets=n_targets, windows=len(windows))
    if measure_memory:
        reset_peak_memory()
        result.start_rss_mb = resident_memory_mb()
    covered = torch.zeros(n_targets, dtype=torch.int32)
    pos_sum = torch.zeros(length, dtype=torch.float64)
    pos_count = torch.zeros(length, dtype=torch.float64)
    loss_sum = 0.0
    model.eval()
    try:
        for b, first in enumerate(range(0, len(windows), batch_size)):
            batch = windows[first : first + batch_size]
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
            for row, w in enumerate(batch):
                n = w.end - w.start
                input_ids[row, :n] = stream[w.start : w.end]
                skip = w.score_from - w.start
                labels[row, skip:n] = stream[w.start + 1 + skip : w.end + 1]
                covered[w.score_from : w.end] += 1
            _sync(device)
            t0 = time.perf_counter()
            losses = token_losses(model, input_ids.to(device), labels.to(device))
            mask = (labels != IGNORE_INDEX).to(device)
            batch_sum = float(losses[mask].double().sum())
            _sync(device)
            elapsed = time.perf_counter() - t0
            scored = int(mask.sum())
            if b > 0 or len(windows) <= batch_size:  # the first of several batches warms up (allocation)
                result.seconds += elapsed
                result.timed_targets += scored
            loss_sum += batch_sum
            masked = torch.where(mask, losses, torch.zeros_like(losses)).double().cpu()
            pos_sum += masked.sum(dim=0)
            pos_count += mask.cpu().double().sum(dim=0)
            result.input_tokens += sum(w.end - w.start for w in batch)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is recorded; anything else is a bug and raises
        if not is_out_of_memory(exc):
            raise
        result.status, result.error = "oom", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        del exc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        if measure_memory:
            result.peak_mb = peak_memory_mb(device)
    if result.status == "ok":
        if not bool((covered == 1).all()):
            raise AssertionError(f"window plan scored targets {int((covered != 1).sum())} times != 1 (bug)")
        result.loss_sum = loss_sum
        result.position_loss_sum, result.position_count = pos_sum, pos_count
    return result
