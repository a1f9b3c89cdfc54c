"""The interface every optimization technique implements, and the run context it acts on.

A technique (one module under ``bkexp.techniques``) declares

- ``settings``: a dataclass whose fields are its flag (named like the technique) and its settings, with the
  defaults of ``conf/flags/none.yaml``; the registry joins them into :class:`bkexp.techniques.Flags`;
- ``validate``: types and ranges of its own settings; ``conflicts``: techniques it cannot run with;
- applicability: ``not_applicable`` (model, bits, hardware, from the config) and ``data_not_applicable``
  (from the built datamodule), each returning the reason or None;
- what it changes: ``config_changes`` (config keys set before anything is built), ``task_kwargs`` (the
  training step: ``LMTask`` arguments, e.g. a loss term or batch selection), ``setup`` (after the model is
  built: a model wrapper or in-place change, Lightning ``callbacks``);
- ``describe``: its measured effect, recorded in summary.json under ``flags.effects``.

The hooks run for a technique that is on (and for a default-on one also when it is off); ``describe``
also for an ``always_describe`` one. An instance lives for one run (``Technique(flags)``), so whatever it sets up (the pruned layers, a
callback) stays on it until ``describe``; nothing travels through the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import DictConfig

from bkexp.errors import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor, nn


class FlagError(ConfigError):
    """An optimization-flag value or combination bkexp refuses; the message says what to do instead."""


class FlagNotApplicableError(FlagError):
    """A flag that does not apply to this model, dataset or bit width (the ablation report shows it as n/a)."""


@dataclass
class RunContext:
    """What a technique may look at and change once the run's pieces exist (filled in as the run proceeds)."""

    cfg: DictConfig
    model: nn.Module | None = None
    sample: Tensor | None = None  # one training batch's input_ids (probe forwards, timings)
    datamodule: Any = None
    device_type: str = "cpu"  # where training runs: cpu | cuda
    trainer: pl.Trainer | None = None
    task: Any = None  # the LightningModule, after training
    quant: Any = None  # the run's QuantSpec


class Technique:
    """Base class; see the module docstring. Subclasses set ``name``, ``settings`` and override what they use."""

    name: ClassVar[str]
    settings: ClassVar[type]  # dataclass: the flag field ``name`` first, then its settings
    summary: ClassVar[str] = ""  # one line for listings (docs/flags.md has the full table)
    default_on: ClassVar[bool] = False  # analytic_gradient is the op's normal backward: on unless asked off
    always_describe: ClassVar[bool] = False  # describe() also when off (e.g. the precision every run used)
    conflicts: ClassVar[dict[str, str]] = {}  # other flag -> why both cannot be on
    tests_final_weights: ClassVar[bool] = False  # test the final weights instead of the best checkpoint

    def __init__(self, flags: Any) -> None:
        self.flags = flags  # the run's joined Flags (settings of every technique)

    # ------------------------------------------------------------------------------------- identity
    @property
    def enabled(self) -> bool:
        return bool(getattr(self.flags, self.name))

    @property
    def changes_run(self) -> bool:
        """True when the run differs from the default because of this flag (on, or off for a default-on one)."""
        return self.enabled != self.default_on

    @classmethod
    def variant(cls) -> str:
        """The ablation's name for this technique's non-default state (``no_<name>`` for default-on ones)."""
        return f"no_{cls.name}" if cls.default_on else cls.name

    # ------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Types and ranges of this technique's settings (always checked, on or off)."""

    def not_applicable(self, cfg: DictConfig) -> str | None:
        """Why this (active) technique does not apply to the configured model / bits / hardware, else None."""
        return None

    def data_not_applicable(self, datamodule: Any, dataset: str) -> str | None:
        """Why this (active) technique does not apply to the built data, else None."""
        return None

    # ----------------------------------------------------------------------------- what it changes
    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        """Dotted config keys -> values to set before anything is built (raise FlagError on a conflict)."""
        return {}

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the LightningModule (``LMTask``) this technique sets."""
        return {}

    def setup(self, ctx: RunContext) -> list[pl.Callback]:
        """After the model is built (and checked): change or wrap it, return Lightning callbacks."""
        return []

    def before_fit(self, ctx: RunContext) -> None:
        """Last change before training (after every copy of the model was made, e.g. compilation)."""

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        """Measured effects after training: ``{key: value}`` merged into summary.json ``flags.effects``."""
        return {}


class ModelTechnique(Technique):
    """A technique implemented by the model: ``model_kwargs`` are set under ``model.`` before it is built."""

    def model_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        return {f"model.{key}": value for key, value in self.model_kwargs().items()}


PLAIN_MODEL = "bkexp.models.LanguageModel"  # what conf/model/*.yaml build; a staged technique replaces it
STAGED_MODEL = "bkexp.models.StagedLanguageModel"  # the plain LM run stage by stage (bkexp/models/staged.py)
# Already staged (the flag files name it, or a user wrote the module path): kept, not refused as a foreign class.
STAGED_TARGETS = (STAGED_MODEL, "bkexp.models.staged.StagedLanguageModel")


class StagedTechnique(ModelTechnique):
    """A technique of the staged model: selects ``StagedLanguageModel`` (``model._target_``) and sets its
    keyword arguments. Its ``conf/flags/<name>.yaml`` states the same keys."""

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        target = str(cfg.model.get("_target_"))
        if target != PLAIN_MODEL and target not in STAGED_TARGETS:
            raise FlagError(f"flags.{self.name} runs the model as {STAGED_MODEL}, but model._target_ is {target!r}; "
                            f"valid: {PLAIN_MODEL} or {STAGED_MODEL}")
        return {"model._target_": STAGED_MODEL, **super().config_changes(cfg)}


def needs_mixer_capability(capability: str, flag: str, cfg: DictConfig) -> str | None:
    cls = mixer_class(cfg)
    if cls is not None and getattr(cls, capability, False):
        return None
    return (f"flags.{flag} applies to BK mixers; model {cfg.model.get('name') or '?'!r} has none (its mixer is "
            f"{mixer_name(cfg)})")


# ------------------------------------------------------------------------------------------ helpers
def check_fraction(name: str, value: Any, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if upper_open:
        ok = ok and value < 1
    if not ok:
        interval = "(0, 1)" if upper_open else "(0, 1]"
        raise FlagError(f"flags.{name} must be a number in {interval}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FlagError(f"flags.{name} must be a positive integer, got {value!r}")


def check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise FlagError(f"flags.{name} must be a number >= 0, got {value!r}")


def mixer_class(cfg: DictConfig) -> type | None:
    """The configured mixer class (its capability attributes answer what a technique needs), or None."""
    from hydra.utils import get_object

    target = (cfg.model.get("mixer") or {}).get("_target_")
    if target is None:
        return None
    obj = get_object(str(target))
    return obj if isinstance(obj, type) else None


def mixer_name(cfg: DictConfig) -> str:
    return str((cfg.model.get("mixer") or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def accelerator_is_cpu(cfg: DictConfig) -> bool:
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
