"""Report plot axes stay readable at any range: labelled ticks on narrow log ranges, linear where log adds nothing."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bkexp.report.plots import set_value_scale, tick_label


def labelled_ticks(values: list[float], log: bool) -> tuple[str, list[str]]:
    fig = Figure()
    ax = fig.subplots()
    ax.plot(range(len(values)), values, marker="o")
    scale = set_value_scale(ax.yaxis, values, log)
    FigureCanvasAgg(fig).draw()
    lo, hi = ax.get_ylim()
    labels = [label.get_text() for label, loc in zip(ax.yaxis.get_majorticklabels(), ax.yaxis.get_majorticklocs())
              if lo <= loc <= hi and label.get_text()]
    return scale, labels


@pytest.mark.parametrize("values,log,scale", [
    ([2.1e4, 1.27e4, 3.0e4], True, "linear"),  # tokens/s within a factor 3: log would label 2x10^4 and 3x10^4 only
    ([600.0, 681.0, 700.0], True, "linear"),  # peak memory in MB
    ([1.0e4, 4.0e4], True, "log"),  # 1..9 per decade: 10k, 20k, 30k, 40k
    ([3.0e3, 9.0e4], True, "log"),  # 1-2-5 per decade
    ([1.0e3, 2.0e6], True, "log"),  # decades
    ([393_800.0, 398_300.0], False, "linear"),
], ids=["tps-narrow", "memory-narrow", "one-decade", "1.5-decades", "3-decades", "linear"])
def test_value_axis_has_at_least_three_labelled_ticks(values, log, scale):
    used, labels = labelled_ticks(values, log)
    assert used == scale
    assert len(labels) >= 3, labels
    assert len(set(labels)) == len(labels), labels  # no two ticks read the same


def test_nonpositive_values_never_get_a_log_axis():
    assert labelled_ticks([0.0, 5.0, 10.0], True)[0] == "linear"


@pytest.mark.parametrize("value,text", [(0, "0"), (300, "300"), (2000, "2k"), (1.5e6, "1.5M"), (2.5e9, "2.5G"),
                                        (2e-5, "2e-05"), (0.25, "0.25")])
def test_tick_label(value, text):
    assert tick_label(value) == text
