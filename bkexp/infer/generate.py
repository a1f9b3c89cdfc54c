"""Batched autoregressive generation through ``LanguageModel.prefill``/``step``: tokens in, tokens out.

``generate(model, prompts, max_new_tokens, sampling, stop_sequences=..., stop=...)`` returns one continuation
(token ids, prompt excluded) per prompt, in order. Prompts of equal length are decoded together in batches
of ``batch_size`` rows (the decoding state of a batch advances one position for every row at once). A row
stops at ``max_new_tokens``, when its continuation ends with one of ``stop_sequences`` (token id lists; the
stop sequence is cut off, as lm-eval's ``until`` does), or when ``stop(continuation)`` returns True (e.g. a
check on the decoded text). The whole batch stops when every row has stopped.

``generate_text`` does the same for strings through a run's tokenizer, with ``until`` stop strings.
Each step costs what the model's state makes it cost: constant for BK and Mamba, growing with the
context for attention (``bkexp bench decode`` measures it). On CPU the prompt's prefill runs on the process's
threads and the token-by-token loop on ``decode_threads``: by default (``"auto"``) one thread while the
decoding state is small (a step is many small ops, and waking more threads costs more than they save), the
process's threads for a large KV cache (``bkexp/threads.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bkexp.infer.sampling import Sampling, sample_next
from bkexp.threads import DECODE_THREADS, check_threads, cpu_threads, decode_threads_for


def _as_prompts(prompts: Sequence[Sequence[int]] | Tensor, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a prompt tensor must be (batch, seq), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    out = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token to condition on")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return out


def _ends_with(tokens: list[int], stops: Sequence[Sequence[int]]) -> int:
    """Length of the stop sequence ``tokens`` ends with (0 if none)."""
    for stop in stops:
        if stop and len(tokens) >= len(stop) and tokens[-len(stop):] == list(stop):
            return len(stop)
    return 0


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
             sampling: Sampling | None = None, *, stop_sequences: Sequence[Sequence[int]] = (),
             stop: Callable[[list[int]], bool] | None = None, batch_size: int = 8,
             decode_threads: int | str | None = DECODE_THREADS) -> list[list[int]]:
    """Continuations (token id lists, prompt excluded) of ``prompts``; see the module docstring.

    ``model`` is a ``LanguageModel`` (anything with ``prefill``/``step``/``vocab_size``); it runs in eval mode
    (restored afterwards). With ``sampling.seed`` set the result is reproducible for the same call.
    ``decode_threads``: CPU threads of the decoding steps: ``"auto"`` (one up to
    ``bkexp.threads.AUTO_STATE_BYTES`` of decoding state, the process's count above), an integer, or None (the
    process's count). The count can change a step's last bits: keep the setting when you compare outputs.
    """
    sampling = sampling or Sampling()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_threads(decode_threads, "decode_threads", allow_auto=True)
    reason = getattr(model, "decode_unsupported", "it has no prefill/step decoding interface")
    if reason is not None:
        raise NotImplementedError(f"cannot generate with {getattr(model, 'name', type(model).__name__)!r}: {reason}")
    rows = _as_prompts(prompts, model.vocab_size)
    device = next(model.parameters()).device
    generator = sampling.generator(device)
    step_threads = decode_threads if device.type == "cpu" else None
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(rows):
        by_length[len(p)].append(i)
    results: list[list[int]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                ids = torch.tensor([rows[i] for i in batch], dtype=torch.long, device=device)
                for i, out in zip(batch, _generate_batch(model, ids, max_new_tokens, sampling, generator,
                                                         stop_sequences, stop, step_threads), strict=True):
                    results[i] = out
    finally:
        model.train(was_training)
    return results


def _generate_batch(model: nn.Module, ids: Tensor, max_new_tokens: int, sampling: Sampling,
                    generator: torch.Generator | None, stop_sequences: Sequence[Sequence[int]],
                    stop: Callable[[list[int]], bool] | None, threads: int | str | None) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    if max_new_tokens == 0:
        return out
    logits, state = model.prefill(ids, capacity=ids.shape[1] + max_new_tokens)
    logits = logits[:, -1]
    done = [False] * ids.shape[0]
    with cpu_threads(decode_threads_for(threads, state.nbytes())):  # the prefill ran on the process's threads
        for step in range(max_new_tokens):
            tokens = sample_next(logits, sampling, generator)
            for r, token in enumerate(tokens.tolist()):
                if done[r]:
                    continue
                out[r].append(token)
                cut = _ends_with(out[r], stop_sequences)
                if cut:
                    del out[r][-cut:]
                    done[r] = True
                elif stop is not None and stop(out[r]):
                    done[r] = True
            if all(done) or step == max_new_tokens - 1:
                break
            logits, state = model.step(tokens, state)
    return out


def cut_at_until(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of the ``until`` strings (lm-eval's ``until``)."""
    for u in until:
        if u:
            text = text.split(u, 1)[0]
    return text


def until_stop(tokenizer: Any, until: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A ``stop`` callback for ``generate``: True once the decoded continuation contains an ``until`` string."""
    until = [u for u in until if u]
    if not until:
        return None
    return lambda tokens: any(u in tokenizer.decode(tokens) for u in until)


def generate_text(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  sampling: Sampling | None = None, *, until: Sequence[str] = (), batch_size: int = 8,
                  decode_threads: int | str | None = DECODE_THREADS) -> list[str]:
    """Continuations of text ``prompts`` through ``tokenizer`` (``encode(text)``/``decode(ids)``), each cut at
    the first of the ``until`` strings (lm-eval's ``generate_until`` semantics)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    outs = generate(model, encoded, max_new_tokens, sampling, stop=until_stop(tokenizer, until),
                    batch_size=batch_size, decode_threads=decode_threads)
    return [cut_at_until(tokenizer.decode(o), until) for o in outs]


__all__ = ["cut_at_until", "generate", "generate_text", "until_stop"]
