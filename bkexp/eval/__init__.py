"""Evaluation above training: perplexity on other corpora and context lengths, lm-eval tasks (``bkexp eval``)."""
