"""Backend choice shared by every op: ``auto`` picks the fastest available and logs when it falls back."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)
_logged: set[str] = set()


@functools.cache
def module_available(name: str) -> bool:
    """Whether ``name`` can be imported; cached, as ``find_spec`` costs about as much as a small op call."""
    return importlib.util.find_spec(name) is not None


def resolve(op: str, backend: str, device: torch.device | str, backends: Sequence[str],
            preferred: dict[str, str], fallback: str,
            unavailable_reason: Callable[[str, torch.device], str | None]) -> str:
    """The backend ``op`` runs on ``device`` for the requested ``backend``.

    ``auto`` takes ``preferred[device.type]`` (else ``fallback``) when it can run, and otherwise ``fallback``
    with one warning per distinct reason. A named backend that cannot run raises with the reason (which
    says how to install it); an unknown name raises with the valid ones.
    """
    device = torch.device(device)
    if backend == "auto":
        choice = preferred.get(device.type, fallback)
        reason = unavailable_reason(choice, device)
        if reason is None:
            return choice
        message = f"{op} backend=auto on {device.type}: {choice} unavailable ({reason}); using {fallback}"
        if message not in _logged:
            _logged.add(message)
            log.warning(message)
        return fallback
    if backend not in backends:
        raise ValueError(f"unknown {op} backend {backend!r}; valid: auto, {', '.join(backends)}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op} backend {backend!r} unavailable: {reason}")
    return backend
