"""``analytic_gradient`` (on by default): the exact O(N) adjoint backward of the BK-Core and the selective scan.

Off (``flags=no_analytic_gradient``), the mixer's recurrent op runs on its autograd backend (BK
``torch_autograd``, Mamba ``ref``): the same gradients through autograd, at another cost. Which backends
differentiate how is declared by the mixers (``adjoint_backends``, ``autograd_backend``,
``autograd_op_backends``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bkexp.techniques.base import FlagError, RunContext, Technique, mixer_class, mixer_name


@dataclass
class Settings:
    analytic_gradient: bool = True


class AnalyticGradient(Technique):
    name = "analytic_gradient"
    settings = Settings
    summary = "exact O(N) adjoint backward of the recurrent ops (off: autograd through the recurrence)"
    default_on = True

    def not_applicable(self, cfg: DictConfig) -> str | None:
        cls = mixer_class(cfg)
        if self.enabled or (cls is not None and cls.autograd_backend is not None):
            return None
        return (f"flags.analytic_gradient=false switches the BK-Core or the selective scan to autograd through its "
                f"recurrence; model {cfg.model.get('name') or '?'!r} has neither (its mixer is {mixer_name(cfg)}, "
                "differentiated by autograd already)")

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        cls = mixer_class(cfg)
        if cls is None or cls.autograd_backend is None:
            return {}
        kind = cls.__name__
        backend = str(cfg.model.mixer.get("backend", "auto"))
        if self.enabled and backend not in cls.adjoint_backends:
            raise FlagError(f"model.mixer.backend={backend} does not differentiate with the exact adjoint, but "
                            f"flags.analytic_gradient=true; use an adjoint backend "
                            f"({', '.join(cls.adjoint_backends)}) or flags.analytic_gradient=false")
        if self.enabled:
            return {}
        if backend not in ("auto", cls.autograd_backend):
            raise FlagError(f"flags.analytic_gradient=false runs the {kind} op through autograd (backend "
                            f"{cls.autograd_backend}), but model.mixer.backend={backend} was forced; remove that "
                            "override")
        return {"model.mixer.backend": cls.autograd_backend}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        """How each recurrent op was differentiated in this run, from the backends that actually ran."""
        autograd: dict[str, tuple[str, ...]] = {}
        for block in ctx.model.blocks:
            autograd.update(block.mixer.autograd_op_backends)
        backends = ctx.model.backends()
        return {"gradient": {
            op: ("autograd through the recurrence" if used in autograd[op] else "exact adjoint") + f" ({op}={used})"
            for op, used in backends.items() if op in autograd}}
