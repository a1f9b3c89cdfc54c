"""Reporting: turn run and sweep directories into summary.csv/.md, comparison.json and plots (`bkexp report`).

Kept import-light (pandas and matplotlib load on first use) because Hydra imports the callback module at the
start of every multirun.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def write_report(*args: Any, **kwargs: Any) -> Any:
    """See bkexp.report.cli.write_report."""
    from bkexp.report.cli import write_report as _write_report

    return _write_report(*args, **kwargs)
