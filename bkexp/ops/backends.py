"""Backend choice shared by every op: which backends can run here, and ``auto`` picking the fastest available.

Each op declares its backends once as an :class:`OpBackends` (names, what ``auto`` prefers per device, the
fallback, and why a backend cannot run); ``available`` and ``resolve`` are the same for every op.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)
_logged: set[str] = set()


@functools.cache
def _find_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# Ops resolve their backend on every call, also inside torch.compile'd models: dynamo runs this once per graph and
# keeps the answer (it would otherwise trace into the cache and warn about it on every compiled run).
@torch.compiler.assume_constant_result
def module_available(name: str) -> bool:
    """Whether ``name`` can be imported; cached, as ``find_spec`` costs about as much as a small op call."""
    return _find_module(name)


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


NUMBA_HINT = "the cpu backend needs numba: pip install numba"


def numba_cpu_unavailable(device: torch.device) -> str | None:
    """Why a numba ``cpu`` backend cannot run on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {device}"
    if not module_available("numba"):
        return NUMBA_HINT
    return None


@dataclass(frozen=True)
class OpBackends:
    """One op's backends: ``names``, what ``auto`` prefers per device type, its fallback (always available),
    and ``unavailable_reason(name, device)``: why a backend cannot run (None when it can)."""

    op: str
    names: tuple[str, ...]
    preferred: dict[str, str] = field(hash=False)
    fallback: str
    unavailable_reason: Callable[[str, torch.device], str | None]

    def available(self, device: torch.device | str = "cpu") -> list[str]:
        """Backends that can run on ``device`` in this environment."""
        device = torch.device(device)
        return [name for name in self.names if self.unavailable_reason(name, device) is None]

    def resolve(self, backend: str, device: torch.device | str) -> str:
        """The backend the op runs on ``device`` for the requested ``backend``; raises if it cannot run."""
        return resolve(self.op, backend, device, self.names, self.preferred, self.fallback, self.unavailable_reason)


def numba_cpu_backends(op: str) -> OpBackends:
    """The backends of an op with a numba kernel for CPU tensors and a PyTorch reference: ``cpu`` and ``ref``;
    ``auto`` takes cpu for CPU tensors when numba is installed, ref otherwise."""
    return OpBackends(op, ("cpu", "ref"), {"cpu": "cpu"}, "ref",
                      lambda name, device: numba_cpu_unavailable(device) if name == "cpu" else None)


def pytorch_ops_required() -> bool:
    """Whether CPU autocast, a dispatch mode (FLOP counting, fake tensors) or ``torch.compile`` is active: a
    compiled CPU kernel must then leave the work to PyTorch's ops, whose casting rules, dispatch and tracing
    apply to them and not to a numba call."""
    # is_compiling first: dynamo folds it to True and never reaches the dispatch-mode query, which it cannot trace
    # (a graph break at every op, after which the rest of the test ran eagerly and picked the numba kernel)
    return (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or _get_current_dispatch_mode() is not None)


def compiled_cpu_path_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether a numba CPU kernel can take ``tensors`` (None entries skipped): plain tensors -- not subclasses,
    such as torchao's quantized weights, which bring their own ops -- on CPU, all float32 or all float64, with
    nothing active that must see PyTorch's ops (``pytorch_ops_required``)."""
    given = [t for t in tensors if t is not None]
    dtype = given[0].dtype
    return (dtype in (torch.float32, torch.float64)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == dtype
                    for t in given)
            and not pytorch_ops_required())
