"""What "a run directory" is, for every command that reads runs: eval, eval-quant, generate, export, report.

A run directory is what ``python train.py`` writes (``outputs/<stamp>/`` or one job of a sweep,
``multirun/<stamp>/<job>_<overrides>/``)::

    .hydra/config.yaml     the composed config           summary.json   the run's record
    checkpoints/           best-<step>.ckpt, last.ckpt   tokenizer/     what rebuilds the run's tokenizer

This module finds runs (a sweep directory expands to its jobs), loads a run's config (its relative paths and
environment-variable values as the run read them), summary, tokenizer and checkpoint, rebuilds its model and
datamodule, and re-exports the atomic file writers every command uses for its results. It also reads what
``bkexp export`` writes, a *model folder* (config.json, model.safetensors, tokenizer files), locally or from a
Hugging Face hub repository (:class:`ModelFolder`), so that ``bkexp generate``, ``bkexp eval``, ``eval-quant``,
``bench run`` and lm_eval take a shared model wherever they take a run. Checkpoints are only ever loaded with
``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused, never executed.

Importing this module does not import torch or Lightning (``bkexp report`` uses it to find runs); the
methods that need them import them when called.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from bkexp import config_env
from bkexp.utils import atomic_save_figure, atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

    from bkexp.data.tokenizers import Tokenizer

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "SUMMARY_FILE", "TOKENIZER_DIR", "ModelFolder", "RunDir", "RunDirError",
    "atomic_save_figure", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "build_run_model",
    "checkpoint_step", "find_model", "find_models", "find_run_dirs", "is_run_dir", "parse_overrides",
]

log = logging.getLogger(__name__)
_ENV_WARNED: set[str] = set()  # runs whose differing environment was already reported in this process

CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"  # Hydra's own settings of the run, with the directory it was launched in
# Config keys holding local paths, which the run read relative to the directory `python train.py` ran in.
RELATIVE_PATH_KEYS = ("dataset.data_dir", "dataset.token_cache", "tokenizer.path", "dataset.tokenizer.path")
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_CHOICES = ("best", "last")
LEGACY_FLAGS_TARGETS = ("bkexp.train.flags.Flags",)  # where the flags dataclass lived in earlier runs' configs
# A model folder (what `bkexp export` writes, what a hub repository of a bkexp model holds):
MODEL_CONFIG_FILE = "config.json"  # model_type "bkexp": the model (and quant) config, vocab size, seq_len, bits
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "bkexp"
# A Hugging Face repository id (owner/name), as huggingface_hub validates it.
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class RunDirError(ValueError):
    """A path that is not a usable run (or sweep) directory, or a run file that cannot be used; says why."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by one training run (Hydra's ``.hydra/`` or a ``summary.json``)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / OVERRIDES_FILE).is_file() or (path / SUMMARY_FILE).is_file()


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory given or below the given directories (a sweep expands to its jobs), in order.

    A run directory is not searched further (its checkpoints and logs hold no runs). Each path must be a
    directory holding at least one run, else :class:`RunDirError` names it. A run reached through two
    arguments is listed once.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            raise RunDirError(f"{root} is not a directory")
        runs = _runs_under(root)
        if not runs:
            raise RunDirError(f"{root} is neither a run directory (no {CONFIG_FILE} or {SUMMARY_FILE}) nor a "
                              "sweep directory holding runs: give outputs/<stamp> or multirun/<stamp> written by "
                              "`python train.py`")
        for run in runs:
            key = run.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run)
    return found


def _runs_under(root: Path) -> list[Path]:
    if is_run_dir(root):
        return [root]
    runs: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        keep = []
        for name in dirnames:
            child = Path(dirpath) / name
            if is_run_dir(child):
                runs.append(child)
            elif not name.startswith("."):
                keep.append(name)
        dirnames[:] = keep
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(root)))


def _natural_key(path: Path) -> tuple:
    """Sweep jobs in job order (2_... before 10_...), then by name."""
    return tuple((0, int(part.split("_", 1)[0]), part) if part.split("_", 1)[0].isdigit() else (1, 0, part)
                 for part in path.parts)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, bool]]:
    """``KEY=VALUE`` (an existing key) or ``+KEY=VALUE`` (a new one) -> (key, YAML-parsed value, add)."""
    import yaml

    parsed = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        add = key.startswith("+")
        key = key.lstrip("+").strip()
        if not sep or not key:
            raise RunDirError(f"override {item!r}: expected KEY=VALUE (or +KEY=VALUE to add a key)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise RunDirError(f"override {item!r}: the value is not valid YAML ({err})") from None
        parsed.append((key, value, add))
    return parsed


_MISSING = object()


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], what: str) -> DictConfig:
    """``cfg`` with ``KEY=VALUE`` (an existing key) and ``+KEY=VALUE`` (a new one) applied; a mistyped key is an
    error naming it."""
    for key, value, add in parse_overrides(overrides):
        if not add and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise RunDirError(f"override {key}={value!r}: {what} has no key {key!r} (use +{key}=... to add one)")
        OmegaConf.update(cfg, key, value, merge=True, force_add=add)
    return cfg


class RunDir:
    """One training run's directory: its config, summary, tokenizer, checkpoints, model and data.

    >>> run = RunDir("outputs/2026-11-29_12-00-00-000000")
    >>> model = run.build_model("best")          # weights loaded, quantized as the run tested it, eval mode
    >>> dm = run.build_datamodule(["dataset.data_dir=/data/wt2"])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a directory")
        if not is_run_dir(self.path):
            raise RunDirError(f"{self.path} is not a run directory (no {CONFIG_FILE} or {SUMMARY_FILE})")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------------------ config
    def config(self, overrides: Sequence[str] = ()) -> DictConfig:
        """The config the run was built from, with ``paths.output_dir`` pointing at this directory.

        That is ``.hydra/config.yaml`` as composed, plus the model/trainer/quant keys the run's techniques
        set before building (recomputed, as ``run()`` does), plus ``overrides`` (``KEY=VALUE`` for an
        existing key, ``+KEY=VALUE`` for a new one; a mistyped key is an error naming it).
        """
        import bkexp.resolvers  # noqa: F401  (resolvers the config tree uses)

        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise RunDirError(f"{self.path}: no {CONFIG_FILE} (was this directory written by `python train.py`?)")
        try:
            cfg = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - any parse failure gets the same one-line message
            raise RunDirError(f"{path}: cannot be read as YAML ({type(err).__name__}: {err})") from None
        if "paths" in cfg:
            cfg.paths.output_dir = str(self.path)
        self._pin_environment(cfg)
        _apply_techniques(cfg, path)
        launch_dir = self.launch_dir()
        if launch_dir is not None:
            _anchor_paths(cfg, launch_dir)
        return apply_overrides(cfg, overrides, "the run's config")  # relative to this process's directory

    def _pin_environment(self, cfg: DictConfig) -> None:
        """Values that read environment variables (``${oc.env:...}``) as the run resolved them
        (:mod:`bkexp.config_env`); said once per run where this environment gives other values."""
        try:
            resolved = self.summary().get("config")
        except RunDirError:  # no summary (killed before training): the config resolves in this environment
            return
        moved = config_env.pin(cfg, resolved if isinstance(resolved, dict) else None)
        if moved and str(self.path) not in _ENV_WARNED:
            _ENV_WARNED.add(str(self.path))
            log.warning("%s: its config reads environment variables, set otherwise here; the run's values are used "
                        "(--override KEY=VALUE to read elsewhere): %s", self.path, config_env.describe(moved))

    def launch_dir(self) -> Path | None:
        """The directory ``python train.py`` ran in (Hydra's ``runtime.cwd``); None when the run did not record it."""
        try:
            cwd = OmegaConf.select(OmegaConf.load(self.path / HYDRA_FILE), "hydra.runtime.cwd", default=None,
                                   throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - a missing or unreadable hydra.yaml: the run's paths stay as written
            return None
        return Path(cwd) if isinstance(cwd, str) and os.path.isabs(cwd) else None

    # ----------------------------------------------------------------------------------------- summary
    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    def summary(self) -> dict[str, Any]:
        """summary.json as a dict; a missing or unreadable file is a :class:`RunDirError` naming it."""
        try:
            data = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{self.path}: no {SUMMARY_FILE} (the run was killed, or is still running)") from None
        except (OSError, ValueError) as err:
            raise RunDirError(f"{self.summary_path}: unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.summary_path}: top level is {type(data).__name__}, expected an object")
        return data

    # ------------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self, which: str | os.PathLike = "best") -> Path:
        """``best`` (checkpoints/best-*.ckpt, else last.ckpt), ``last`` (checkpoints/last.ckpt), or a file path.

        A path is taken as given, else relative to the run directory.
        """
        ckpt_dir = self.path / CHECKPOINT_DIR
        if str(which) in CHECKPOINT_CHOICES:
            best = sorted(ckpt_dir.glob("best-*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
            if which == "best" and best:
                return best[-1]
            last = ckpt_dir / "last.ckpt"
            if last.is_file():
                if which == "best":
                    log.info("%s: no best-*.ckpt; using last.ckpt", self.path)
                return last
            present = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
            raise RunDirError(f"{self.path}: no {which} checkpoint (expected {CHECKPOINT_DIR}/best-*.ckpt or "
                              f"{CHECKPOINT_DIR}/last.ckpt; found: {', '.join(present) or 'none'})")
        path = Path(which)
        for candidate in (path, self.path / path):
            if candidate.is_file():
                return candidate
        raise RunDirError(f"checkpoint {str(which)!r}: no such file (valid: best, last, or a path to a .ckpt)")

    def load_checkpoint(self, which: str | os.PathLike = "best") -> dict[str, Any]:
        """The checkpoint as a dict, loaded on CPU with ``torch.load(weights_only=True)`` only."""
        return load_checkpoint_file(self.checkpoint_path(which))

    # ------------------------------------------------------------------------------------------- build
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer, rebuilt exactly from ``tokenizer/`` (word vocabulary, bytes, ids, pretrained)."""
        from bkexp.data.tokenizers import load_tokenizer

        directory = self.path / TOKENIZER_DIR
        if not directory.is_dir():
            raise RunDirError(f"{self.path}: no {TOKENIZER_DIR}/ (runs save their tokenizer since bkexp writes "
                              "it at the start of training; this run predates that or failed before its data "
                              "was built)")
        try:
            return load_tokenizer(directory)
        except (OSError, ValueError, RuntimeError) as err:
            raise RunDirError(f"{directory}: {err}") from None

    def build_datamodule(self, overrides: Sequence[str] = (), stage: str | None = "fit",
                         cfg: DictConfig | None = None) -> Any:
        """The run's datamodule (prepared and set up for ``stage``; None: neither), with the saved tokenizer."""
        cfg = self.config(overrides) if cfg is None else cfg
        saved = "tokenizer" in cfg.dataset and self.has_tokenizer()
        return _build_datamodule(cfg, self.tokenizer() if saved else None, f"{self.path}: the run's", stage)

    def has_tokenizer(self) -> bool:
        """Whether the run saved its tokenizer (``tokenizer/``: every text run since bkexp records it)."""
        return (self.path / TOKENIZER_DIR).is_dir()

    def vocab_size(self, cfg: DictConfig | None = None) -> int:
        """The model's vocabulary size: from the saved tokenizer, else the summary, else the datamodule."""
        if self.has_tokenizer():
            return int(self.tokenizer().vocab_size)
        if self.summary_path.is_file():
            size = (self.summary().get("data") or {}).get("vocab_size")
            if isinstance(size, int):
                return size
        return int(self.build_datamodule(cfg=cfg).vocab_size)

    def build_model(self, which: str | os.PathLike = "best", device: str | torch.device = "cpu",
                    overrides: Sequence[str] = (), cfg: DictConfig | None = None,
                    quantized: bool = True) -> torch.nn.Module:
        """The run's model with the checkpoint's weights (strict), in eval mode, on ``device``.

        ``quantized=True`` (the default): the model the run tested, with its quantization applied
        (:func:`build_run_model`), so eval, generate and export give the test's logits. ``False``: the float
        (latent) weights without quantization layers, for tools that quantize themselves (``eval-quant``).
        """
        cfg = self.config(overrides) if cfg is None else cfg
        quant = cfg.get("quant") if quantized else None
        model = build_run_model(cfg.model, quant, self.vocab_size(cfg))
        path = self.checkpoint_path(which)
        load_model_weights(model, load_checkpoint_file(path), path)
        return model.to(device).eval()


def build_run_model(model_cfg: Any, quant_cfg: Any | None, vocab_size: int) -> torch.nn.Module:
    """A run's model as its test evaluated it, before loading weights: the one path every loader takes.

    ``model_cfg`` is the run's ``model`` config, ``quant_cfg`` its ``quant`` config (``None``: float model).
    The quantization layers are installed as training did (``QuantSpec.prepare``) and switched on as the test
    did (``QuantSpec.finalize``: QAT quantizes throughout, PTQ from the test on). Parameter names do not change,
    so the weights of a checkpoint or an export load strictly afterwards. A model config saved before
    ``bkexp/models/staged.py`` (``LanguageModel`` with staged keywords) builds the staged model. Used by
    :meth:`RunDir.build_model` and ``bkexp.export.from_pretrained``.
    """
    from hydra.utils import instantiate

    from bkexp.models.staged import STAGED_KEYS
    from bkexp.techniques.base import PLAIN_MODEL, STAGED_MODEL

    if str(model_cfg.get("_target_")) == PLAIN_MODEL and STAGED_KEYS & set(model_cfg.keys()):
        # Saved before staged execution left the plain model, which then took the techniques' keywords.
        plain = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
        model_cfg = {**plain, "_target_": STAGED_MODEL}
    model = instantiate(model_cfg, vocab_size=vocab_size)
    if quant_cfg is not None:
        spec = instantiate(quant_cfg)
        spec.finalize(spec.prepare(model))
    return model


# --------------------------------------------------------------------------------------- model folders
class ModelFolder:
    """A model written by ``bkexp export``: a local folder, or the files of a hub repository in the hub cache.

    >>> folder = ModelFolder.open("me/bkexp-bk-wikitext2")    # or a local folder; revision= a branch, tag or commit
    >>> model, tokenizer = folder.build_model(), folder.tokenizer()

    A folder holds the model and its tokenizer, not the run: no checkpoints, metrics or summary.json.
    :meth:`config` is what rebuilds the model (``model``, ``quant``, ``seq_len``, ``bits``) and, in folders
    exported since bkexp records them, the training ``dataset`` config (resolved), so ``bkexp eval --datasets run``
    and the held-out checks find the run's data where it is reachable, and the ``optimizer`` (``bench run``).
    """

    def __init__(self, path: str | os.PathLike, source: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.info = read_model_config(self.path)
        self.source = source or {"kind": "folder", "path": str(self.path.resolve())}

    def __repr__(self) -> str:
        return f"ModelFolder({self.name!r})"

    @classmethod
    def open(cls, spec: str | os.PathLike, revision: str | None = None) -> ModelFolder:
        """A local model folder, else the hub repository ``spec`` (owner/name) at ``revision`` (default: main),
        downloaded into the hub cache (its cached copy when the hub cannot be reached)."""
        path = Path(spec).expanduser()
        if path.exists():
            if revision is not None:
                raise RunDirError(f"revision {revision!r} selects a version of a hub repository; {spec} is a local "
                                  "folder")
            return cls(path)
        if not HUB_REPO_ID.fullmatch(str(spec)):
            raise RunDirError(f"{spec}: no such file or directory, and not a hub repository id (owner/name)")
        folder, source = _download_model(str(spec), revision)
        return cls(folder, source)

    @property
    def name(self) -> str:
        return self.source.get("repo_id") or self.path.name

    @property
    def weights_path(self) -> Path:
        return self.path / MODEL_WEIGHTS_FILE

    def config(self, overrides: Sequence[str] = ()) -> DictConfig:
        """The part of the run's config the folder records (see the class docstring), plus ``overrides``."""
        info = self.info
        cfg = OmegaConf.create({"model": info["model"], "quant": info.get("quant"), "seq_len": info.get("seq_len"),
                                "bits": info.get("bits"), "dataset": info.get("dataset"),
                                "optimizer": info.get("optimizer")})
        return apply_overrides(cfg, overrides, f"the model folder's {MODEL_CONFIG_FILE}")

    def tokenizer(self) -> Tokenizer:
        from bkexp.data.tokenizers import load_tokenizer

        try:
            return load_tokenizer(self.path)
        except (OSError, ValueError, RuntimeError) as err:
            raise RunDirError(f"{self.name}: its tokenizer files cannot be read: {err}") from None

    def refuse_checkpoint(self, checkpoint: str | os.PathLike | None) -> None:
        """A RunDirError for a ``--checkpoint`` choice, which only a run directory has."""
        if checkpoint is not None:
            raise RunDirError(f"--checkpoint {str(checkpoint)!r} picks a checkpoint of a run directory; {self.name} is "
                              "an exported model folder, which holds one set of weights")

    def results_dir(self, kind: str = "eval") -> Path:
        """Where a command writes its results by default (``kind``: ``eval`` for ``bkexp eval`` and ``eval-quant``,
        ``benchmarks`` for ``bkexp bench run``): ``FOLDER/<kind>`` for a local folder, ``<kind>/<owner>--<name>`` in
        the working directory for a hub repository (its cached files are not ours to change)."""
        repo = self.source.get("repo_id")
        return Path(kind) / repo.replace("/", "--") if repo else self.path / kind

    def build_datamodule(self, overrides: Sequence[str] = (), stage: str | None = "fit",
                         cfg: DictConfig | None = None) -> Any:
        """The training dataset's datamodule as ``config.json`` records it, with the folder's tokenizer; a folder
        exported before the dataset was recorded is a RunDirError."""
        cfg = self.config(overrides) if cfg is None else cfg
        if cfg.get("dataset") is None:
            raise RunDirError(f"{self.name}: its {MODEL_CONFIG_FILE} records no training dataset (exported before "
                              "bkexp recorded one): export the run again")
        tokenizer = self.tokenizer() if "tokenizer" in cfg.dataset else None
        return _build_datamodule(cfg, tokenizer, f"{self.name}: the training", stage)

    def build_model(self, device: str | torch.device = "cpu", cfg: DictConfig | None = None,
                    quantized: bool = True) -> torch.nn.Module:
        """The exported model (quantized as the run tested it, unless ``quantized=False``), weights loaded
        strictly, in eval mode, on ``device``: its logits are the exported checkpoint's."""
        from safetensors.torch import load_model

        cfg = self.config() if cfg is None else cfg
        model = build_run_model(cfg.model, cfg.get("quant") if quantized else None, int(self.info["vocab_size"]))
        try:
            load_model(model, str(self.weights_path), strict=True, device=str(device))
        except FileNotFoundError:
            raise RunDirError(f"{self.name}: no {MODEL_WEIGHTS_FILE}") from None
        except RuntimeError as err:
            raise RunDirError(f"{self.weights_path}: weights do not fit the model rebuilt from {MODEL_CONFIG_FILE}: "
                              f"{' '.join(str(err).split())}") from None
        return model.to(device).eval()


def _build_datamodule(cfg: DictConfig, tokenizer: Tokenizer | None, whose: str, stage: str | None) -> Any:
    """``cfg.dataset`` instantiated with ``tokenizer`` (never refit: the vocabulary is the model's own), prepared and
    set up for ``stage``; data that cannot be read here is a RunDirError saying how to point at a copy."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    def unreadable(cause: BaseException) -> RunDirError:
        return RunDirError(f"{whose} data cannot be read here ({type(cause).__name__}: {cause}); point at a copy "
                           "with `--override dataset.data_dir=DIR` (bkexp eval, eval-quant, bench run)")

    try:
        datamodule = instantiate(cfg.dataset, **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    except InstantiationException as err:  # e.g. its data folder is not on this machine
        raise unreadable(err.__cause__ or err) from None
    if stage is not None:
        try:
            datamodule.prepare_data()
            datamodule.setup(stage)
        except OSError as err:  # a file or hub dataset that is named but missing, or a hub that cannot be reached
            raise unreadable(err) from None
    return datamodule


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json; a folder without one, or another library's, is a RunDirError saying so."""
    path = folder / MODEL_CONFIG_FILE
    if not path.is_file():
        kind = "a run directory" if is_run_dir(folder) else "a directory" if folder.is_dir() else "not a directory"
        raise RunDirError(f"{folder}: no {MODEL_CONFIG_FILE} ({kind}); not a model folder written by `bkexp export`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict) or info.get("model_type") != MODEL_TYPE:
        found = info.get("model_type") if isinstance(info, dict) else type(info).__name__
        raise RunDirError(f"{path}: model_type {found!r}, expected {MODEL_TYPE!r}: not a model folder written by "
                          "`bkexp export`")
    return info


def _download_model(repo_id: str, revision: str | None) -> tuple[Path, dict[str, Any]]:
    """The files of hub repository ``repo_id`` in the local hub cache: config.json first (a repository that is not a
    bkexp model is refused before its weights download), then the rest. Offline, or with the hub unreachable, the
    cached copy is used; every failure is a RunDirError that names the repository and why."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from bkexp.data.tokenizers import hub_unavailable

    why = hub_unavailable()
    at = "" if revision is None else f" at revision {revision!r}"
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "local_files_only": why is not None}
    try:
        read_model_config(Path(hf_hub_download(filename=MODEL_CONFIG_FILE, **kwargs)).parent)
        folder = Path(snapshot_download(**kwargs))
    except LocalEntryNotFoundError:
        raise RunDirError(f"{repo_id}: no such local folder, and {why or 'the hub did not answer'}; the hub cache "
                          f"({constants.HF_HUB_CACHE}) holds no copy of that repository{at}") from None
    except RevisionNotFoundError:
        raise RunDirError(f"hub repository {repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise RunDirError(f"{repo_id}: no such local folder, and no hub repository {repo_id} (or it is private or "
                          "gated: log in with `huggingface-cli login` or set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise RunDirError(f"hub repository {repo_id}{at} has no {MODEL_CONFIG_FILE}: not a model written by "
                          "`bkexp export`") from None
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"hub repository {repo_id}{at}: download failed ({type(err).__name__}: {first})") from None
    # the snapshot folder is named by the commit it holds
    return folder, {"kind": "hub", "repo_id": repo_id, "revision": revision, "commit": folder.name,
                    "path": str(folder)}


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file() and not is_run_dir(path)


def find_models(specs: Iterable[str | os.PathLike], revision: str | None = None) -> list[Path | ModelFolder]:
    """What the commands that read trained models accept: run directories and sweep directories (expanded to
    their runs, as :func:`find_run_dirs`), model folders written by ``bkexp export``, and hub repository ids
    (``revision`` applies to those). Each spec must be one of them, else a RunDirError names it."""
    found: list[Path | ModelFolder] = []
    seen: set[Path] = set()
    for spec in specs:
        path = Path(spec).expanduser()
        if is_model_folder(path) or (not path.exists() and HUB_REPO_ID.fullmatch(str(spec))):
            found.append(ModelFolder.open(spec, revision))
            continue
        if not path.exists():
            raise RunDirError(f"{spec}: no such file or directory, and not a hub repository id (owner/name)")
        if path.is_dir() and not _runs_under(path):
            raise RunDirError(f"{path} is neither a run directory (no {CONFIG_FILE} or {SUMMARY_FILE}), a sweep "
                              f"directory holding runs, nor a model folder (no {MODEL_CONFIG_FILE}) written by "
                              "`bkexp export`")
        if revision is not None and path.is_dir():
            raise RunDirError(f"revision {revision!r} selects a version of a hub repository; {path} is a run "
                              "directory")
        for run in find_run_dirs([path]):
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    return found


def find_model(spec: str | os.PathLike, revision: str | None = None) -> Path | ModelFolder:
    """One run directory or model folder (see :func:`find_models`); a sweep directory is a RunDirError naming a run."""
    models = find_models([spec], revision)
    if len(models) > 1:
        raise RunDirError(f"{spec} is a sweep directory of {len(models)} runs; give one of them, e.g. {models[0]}")
    return models[0]


# ---------------------------------------------------------------------------------------- checkpoints
def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU; a file that needs more is refused, never retried unsafely.

    ``mmap=True`` maps the tensors instead of reading them (for a look at the metadata of a large file)."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path}: refused: it cannot be loaded with torch.load(weights_only=True) (it pickles "
                          f"objects other than tensors and plain containers, which could run code): {first}") \
            from None
    except (EOFError, zipfile.BadZipFile, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {first})") from None
    except OSError as err:
        raise RunDirError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(ckpt, dict):
        raise RunDirError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    return ckpt


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step stored in a Lightning checkpoint (read memory-mapped, weights only); RunDirError if the
    file is unreadable or holds no step."""
    ckpt = load_checkpoint_file(path, mmap=True)
    if "global_step" not in ckpt:
        raise RunDirError(f"{path}: no global_step; not a Lightning checkpoint (keys: {sorted(ckpt)[:5]})")
    return int(ckpt["global_step"])


def load_model_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Load a Lightning checkpoint's ``model.``-prefixed state_dict into the bare model (strict)."""
    state = ckpt.get("state_dict", ckpt)
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise RunDirError(f"{path}: no 'model.*' weights in its state_dict (keys: {list(state)[:5]}...)")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise RunDirError(f"{path}: weights do not fit the model rebuilt from the run's config: "
                          f"{str(err).splitlines()[0]} ...") from None


def _anchor_paths(cfg: DictConfig, launch_dir: Path) -> None:
    """Relative local paths of the run (its data folder, token cache, tokenizer file) made absolute against the
    directory the run was launched in, so a command run from elsewhere reads the files training read (not
    whatever the same relative path names from there). Interpolated values are resolved first."""
    for key in RELATIVE_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            OmegaConf.update(cfg, key, str((launch_dir / value).resolve()), merge=False)


def _apply_techniques(cfg: DictConfig, path: Path) -> None:
    """The config keys a run's optimization flags set before building (as ``bkexp.train.run`` does); flags
    that cannot be applied (an edited or foreign config) are a RunDirError naming the file."""
    if cfg.get("flags") is None or "model" not in cfg:
        return
    from bkexp.techniques import FlagError, Techniques

    if cfg.flags.get("_target_") in LEGACY_FLAGS_TARGETS:  # runs recorded before bkexp.techniques existed
        cfg.flags._target_ = "bkexp.techniques.Flags"
    try:
        Techniques.from_config(cfg).configure(cfg)
    except FlagError as err:
        raise RunDirError(f"{path}: its optimization flags cannot be applied: {err}") from err
