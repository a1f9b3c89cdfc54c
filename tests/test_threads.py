"""bkexp.threads: a block of work on a set number of CPU threads, restored afterwards; decoding uses it."""

from __future__ import annotations

from functools import partial

import numba
import pytest
import torch

from bkexp.infer import Sampling, generate
from bkexp.models import MLP, LanguageModel
from bkexp.models.mixers import BKMixer
from bkexp.threads import DECODE_THREADS, check_threads, cpu_threads, thread_option


def test_cpu_threads_sets_torch_and_numba_and_restores_both_also_after_an_error() -> None:
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == (torch_before, numba_before)
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_threads(1):
            raise RuntimeError("inside")
    assert (torch.get_num_threads(), numba.get_num_threads()) == (torch_before, numba_before)
    with cpu_threads(None):  # None: the process's count, untouched
        assert torch.get_num_threads() == torch_before


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match=f"decode_threads must be an integer >= 1 or None .*got {bad!r}"):
        check_threads(bad, "decode_threads")


def test_command_line_thread_counts_read_0_as_the_process_count() -> None:
    assert thread_option("0", "--x") is None and thread_option(0, "--x") is None
    assert thread_option("2", "--x") == 2 and thread_option(3, "--x") == 3
    for bad in ("-1", "two", 1.5, True, ""):
        with pytest.raises(ValueError, match=f"--x must be an integer >= 0 \\(0: the process's thread count\\), "
                                             f"got {bad!r}"):
            thread_option(bad, "--x")


def test_generation_prefills_on_the_process_threads_and_decodes_on_decode_threads() -> None:
    """Seen from inside the model: the thread count while the prompt's prefill runs and while each step runs."""
    torch.manual_seed(0)
    model = LanguageModel(29, 16, 2, partial(BKMixer, n_heads=2), partial(MLP, expansion=2.0)).eval()
    seen: dict[str, set[int]] = {"prefill": set(), "step": set()}
    for name in seen:
        method = getattr(model, name)

        def record(*args, _method=method, _name=name, **kwargs):
            seen[_name].add(torch.get_num_threads())
            return _method(*args, **kwargs)
        setattr(model, name, record)
    process = torch.get_num_threads()
    default = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0))
    assert seen == {"prefill": {process}, "step": {DECODE_THREADS}}
    seen["step"].clear()
    assert generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), decode_threads=None) == default
    assert seen["step"] == {process} and torch.get_num_threads() == process
    with pytest.raises(ValueError, match="decode_threads must be an integer >= 1 or None .*got 0"):
        generate(model, [[1]], 3, decode_threads=0)
