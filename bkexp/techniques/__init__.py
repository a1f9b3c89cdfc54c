"""Optimization techniques (the ``flags`` config group): one module each, and the one list of them.

``TECHNIQUES`` is the registry: the order of docs/flags.md, the fields of :class:`Flags` (``conf/flags``'s
schema), and the ablation sweep (``ablation_variants``) all come from it. A run uses them through
:class:`Techniques` only::

    techniques = Techniques.from_config(cfg)   # validate, check each flag applies (strict or switched off)
    changes = techniques.configure(cfg)        # config keys the techniques set before building
    techniques.check_data(datamodule, name)    # flags that depend on the data
    callbacks = techniques.setup(ctx)          # after the model is built: wrappers, Lightning callbacks
    techniques.before_fit(ctx)                 # e.g. torch.compile, after every copy of the model
    ... LMTask(**techniques.task_kwargs()), trainer.fit ...
    effects = techniques.describe(ctx)         # summary.json flags.effects

Adding a technique: a module here with a ``Settings`` dataclass and a ``Technique`` subclass, its entry in
``TECHNIQUES``, its keys in ``conf/flags/none.yaml`` and a ``conf/flags/<name>.yaml`` (tests check both). One that
changes how the model computes is a ``StagedTechnique`` (it selects ``bkexp.models.StagedLanguageModel``) and adds
its module and stage logic to ``bkexp/models/staged.py``; the plain backbone (``bkexp/models/backbone.py``) and
``bkexp/train`` do not change.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from bkexp.techniques.act import Act
from bkexp.techniques.active_learning import ActiveLearning
from bkexp.techniques.analytic_gradient import AnalyticGradient
from bkexp.techniques.base import FlagError, FlagNotApplicableError, RunContext, Technique
from bkexp.techniques.compile import Compile
from bkexp.techniques.curriculum import Curriculum
from bkexp.techniques.early_exit import EarlyExit
from bkexp.techniques.grad_checkpoint import GradCheckpoint
from bkexp.techniques.koopman import Koopman
from bkexp.techniques.mixed_precision import MixedPrecision
from bkexp.techniques.multi_scale import MultiScale
from bkexp.techniques.physics_informed import PhysicsInformed
from bkexp.techniques.pruning import Pruning
from bkexp.techniques.quantization import Quantization
from bkexp.techniques.sparse_bk import SparseBK

__all__ = ["FLAG_NAMES", "TECHNIQUES", "FlagError", "FlagNotApplicableError", "Flags", "RunContext", "Technique",
           "Techniques", "ablation_variants"]

log = logging.getLogger(__name__)

# The registry, in the order of docs/flags.md.
TECHNIQUES: tuple[type[Technique], ...] = (
    AnalyticGradient, MixedPrecision, Quantization, Pruning, Act, MultiScale, SparseBK, EarlyExit, Curriculum,
    ActiveLearning, Koopman, PhysicsInformed, Compile, GradCheckpoint,
)
FLAG_NAMES: tuple[str, ...] = tuple(t.name for t in TECHNIQUES)
BY_NAME: dict[str, type[Technique]] = {t.name: t for t in TECHNIQUES}


def _flags_fields() -> list[tuple[str, type, dataclasses.Field]]:
    out = [("strict", bool, dataclasses.field(default=True))]
    for technique in TECHNIQUES:
        fields = dataclasses.fields(technique.settings)
        if fields[0].name != technique.name:
            raise TypeError(f"{technique.__name__}.settings must start with the flag {technique.name!r}")
        out += [(f.name, f.type, dataclasses.field(default=f.default)) for f in fields]
    return out


def _validate(self: Any) -> Any:
    """Types and ranges of every setting, and flags that cannot run together (applicability is separate)."""
    for name in ("strict", *FLAG_NAMES):
        if not isinstance(getattr(self, name), bool):
            raise FlagError(f"flags.{name} must be true or false, got {getattr(self, name)!r}")
    for technique in TECHNIQUES:
        technique(self).validate()
    for technique in TECHNIQUES:
        for other, why in technique.conflicts.items():
            if getattr(self, technique.name) and getattr(self, other):
                raise FlagError(why)
    return self


def _enabled(self: Any) -> list[str]:
    """Flags that change the run, by name (``no_<name>`` when a default-on flag is switched off)."""
    return [t.variant() for t in TECHNIQUES if t(self).changes_run]


def _settings(self: Any) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The optimization flags of a run: ``strict`` and every technique's settings (conf/flags/none.yaml documents them).
Flags = dataclasses.make_dataclass("Flags", _flags_fields(), namespace={
    "validate": _validate, "enabled": _enabled, "settings": _settings,
    "__doc__": "The optimization flags of a run: ``strict`` plus every technique's settings (conf/flags/none.yaml).",
})
Flags.__module__ = __name__


def ablation_variants() -> list[str]:
    """The flags ablation: ``none`` and each technique's non-default state (``conf/flags/<variant>.yaml``)."""
    return ["none", *(t.variant() for t in TECHNIQUES)]


def _register_resolver() -> None:
    # conf/sweep/flags_ablation.yaml sweeps ``flags: ${bkexp.flags_ablation:}``: the list lives here only.
    if not OmegaConf.has_resolver("bkexp.flags_ablation"):
        OmegaConf.register_new_resolver("bkexp.flags_ablation", lambda: ",".join(ablation_variants()))


_register_resolver()


class Techniques:
    """The techniques of one run (one instance of every technique, built from the run's Flags)."""

    def __init__(self, flags: Any, skipped: dict[str, str] | None = None) -> None:
        self.flags = flags
        self.skipped = dict(skipped or {})
        self.all = [technique(flags) for technique in TECHNIQUES]

    @property
    def active(self) -> list[Technique]:
        """Techniques whose hooks run: those on, and default-on ones also when off."""
        return [t for t in self.all if t.enabled or t.default_on]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Techniques:
        """Validated flags; a flag that does not apply raises, or with ``strict=false`` is switched off."""
        from hydra.utils import instantiate

        node = cfg.get("flags")
        flags = instantiate(node) if node is not None else Flags()
        flags.validate()
        reasons = {t.name: why for t in (technique(flags) for technique in TECHNIQUES)
                   if t.changes_run and (why := t.not_applicable(cfg)) is not None}
        techniques = cls(flags)
        techniques._switch_off(reasons)
        return techniques

    def _switch_off(self, reasons: dict[str, str]) -> None:
        if reasons and self.flags.strict:
            raise FlagNotApplicableError("; ".join(reasons.values())
                                         + " (flags.strict=false switches flags that do not apply off instead)")
        for name, reason in reasons.items():
            log.warning("flag %s switched off: %s", name, reason)
            setattr(self.flags, name, BY_NAME[name].default_on)  # off, i.e. back to the default
        self.skipped.update(reasons)

    def enabled(self) -> list[str]:
        return self.flags.enabled()

    def record(self) -> dict[str, Any]:
        """summary.json ``flags``: every setting, the flags that change the run, and those switched off."""
        return {**self.flags.settings(), "enabled": self.enabled(), "skipped": dict(self.skipped)}

    # --------------------------------------------------------------------------------- the run's hooks
    def configure(self, cfg: DictConfig) -> dict[str, Any]:
        """Set the keys the techniques change in ``cfg`` (the config that is built); returns them."""
        changes: dict[str, Any] = {}
        for technique in self.active:
            changes.update(technique.config_changes(cfg))
        with open_dict(cfg):
            for key, value in changes.items():
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        return changes

    def check_data(self, datamodule: Any, dataset: str) -> dict[str, str]:
        """Flags that depend on the data; returns those switched off (``strict=false``), raises otherwise."""
        reasons = {t.name: why for t in self.all
                   if t.changes_run and (why := t.data_not_applicable(datamodule, dataset)) is not None}
        if reasons and self.flags.strict:
            raise FlagNotApplicableError("; ".join(reasons.values()))
        self._switch_off(reasons)
        return reasons

    def task_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for technique in self.active:
            kwargs.update(technique.task_kwargs())
        return kwargs

    def setup(self, ctx: RunContext) -> list[Any]:
        callbacks: list[Any] = []
        for technique in self.active:
            callbacks += technique.setup(ctx)
        return callbacks

    def before_fit(self, ctx: RunContext) -> None:
        for technique in self.active:
            technique.before_fit(ctx)

    @property
    def tests_final_weights(self) -> bool:
        return any(t.tests_final_weights for t in self.active)

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        """What the techniques measurably did (summary.json ``flags.effects``), plus the model's own stats."""
        effects: dict[str, Any] = {}
        for technique in self.all:
            if technique.enabled or technique.default_on or technique.always_describe:
                effects.update(technique.describe(ctx))
        if hasattr(ctx.model, "flag_stats"):
            effects["model"] = ctx.model.flag_stats()
        return effects
