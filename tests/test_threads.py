"""bkexp.threads: a block of work on a set number of CPU threads, restored afterwards; decoding uses it."""

from __future__ import annotations

from functools import partial

import numba
import pytest
import torch

from bkexp.infer import Sampling, generate
from bkexp.models import MLP, LanguageModel
from bkexp.models.mixers import BKMixer
import bkexp.threads
from bkexp.threads import AUTO_STATE_BYTES, check_threads, cpu_threads, decode_threads_for, thread_option


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


def test_export_sets_omp_num_threads_for_the_block_and_restores_it(monkeypatch) -> None:
    """What Lightning's distributed launchers read before they set a count of their own."""
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with cpu_threads(1, export=True):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with cpu_threads(1, export=True):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7"
    with cpu_threads(1):  # not exported: the variable is left alone
        assert os.environ["OMP_NUM_THREADS"] == "7"


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", "auto"])
def test_bad_thread_counts_are_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match=f"threads must be an integer >= 1 or None .*got {bad!r}"):
        check_threads(bad)
    if bad != "auto":
        with pytest.raises(ValueError, match=f"decode_threads must be an integer >= 1, 'auto' or None .*got {bad!r}"):
            check_threads(bad, "decode_threads", allow_auto=True)
    assert check_threads("auto", allow_auto=True) == "auto"


def test_auto_decodes_on_one_thread_up_to_the_state_limit_and_on_the_process_threads_above() -> None:
    assert decode_threads_for("auto", AUTO_STATE_BYTES) == 1
    assert decode_threads_for("auto", AUTO_STATE_BYTES + 1) is None
    assert decode_threads_for(3, 1 << 40) == 3 and decode_threads_for(None, 0) is None


def test_command_line_thread_counts_read_0_as_the_process_count() -> None:
    assert thread_option("0", "--x") is None and thread_option(0, "--x") is None
    assert thread_option("2", "--x") == 2 and thread_option(3, "--x") == 3 and thread_option("auto", "--x") == "auto"
    for bad in ("-1", "two", 1.5, True, ""):
        with pytest.raises(ValueError, match=f"--x must be 'auto' or an integer >= 0 \\(0: the process's thread "
                                             f"count\\), got {bad!r}"):
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
    default = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0))  # "auto", a state of a few hundred bytes
    assert seen == {"prefill": {process}, "step": {1}}
    for setting in (None, process):
        seen["step"].clear()
        assert generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), decode_threads=setting) == default
        assert seen["step"] == {process} and torch.get_num_threads() == process
    with pytest.raises(ValueError, match="decode_threads must be an integer >= 1, 'auto' or None .*got 0"):
        generate(model, [[1]], 3, decode_threads=0)


def test_auto_decodes_a_state_above_the_limit_on_the_process_threads(monkeypatch) -> None:
    torch.manual_seed(0)
    model = LanguageModel(29, 16, 2, partial(BKMixer, n_heads=2), partial(MLP, expansion=2.0)).eval()
    seen: set[int] = set()
    step = model.step

    def record(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return step(*args, **kwargs)
    model.step = record
    monkeypatch.setattr(bkexp.threads, "AUTO_STATE_BYTES", 0)  # every state is "large"
    generate(model, [[1, 2, 3]], 4, Sampling(temperature=0))
    assert seen == {torch.get_num_threads()}
