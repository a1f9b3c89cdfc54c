"""Evaluation above training (runs read through bkexp.rundir): perplexity on other corpora and context lengths,
lm-eval tasks (``bkexp eval``), weight bit widths (``bkexp eval-quant``)."""
