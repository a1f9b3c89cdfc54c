"""Inference: sampling and batched generation through the models' ``prefill``/``step`` decoding interface.

- ``generate(model, prompts, max_new_tokens, Sampling(...), stop_sequences=..., stop=...)``: token ids in,
  token ids out (what lm-eval's ``generate_until`` needs); ``generate_text`` for strings and stop strings.
- ``Sampling``: temperature (0 = greedy), top-k, top-p, seed.
- ``bkexp generate RUN_DIR --prompt TEXT``: the command (``bkexp.infer.cli``).
"""

from bkexp.infer.generate import cut_at_until, generate, generate_text, until_stop
from bkexp.infer.sampling import Sampling, filter_logits, sample_next

__all__ = ["Sampling", "cut_at_until", "filter_logits", "generate", "generate_text", "sample_next", "until_stop"]
