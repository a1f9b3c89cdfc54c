"""Loading a trained run for generation: its model (checkpoint weights, quantization as evaluated) and tokenizer.

Through :class:`bkexp.rundir.RunDir` when it is available (the one definition of a run directory). Until it
is, a minimal stand-in reads the same files: ``.hydra/config.yaml`` (with the config keys the run's flags
set), the checkpoint with ``torch.load(weights_only=True)`` only, and the tokenizer rebuilt from the run's
data (a word vocabulary is refitted on the same training split, which reproduces it exactly).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch


class RunLoadError(ValueError):
    """A run directory or checkpoint generation cannot use; the message names the path and what is expected."""


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the run's model in eval mode on ``device``, with its quantized layers switched on
    when it trained quantized (as it was evaluated), and the run's tokenizer."""
    from hydra.utils import instantiate

    if importlib.util.find_spec("bkexp.rundir") is not None:
        from bkexp.rundir import RunDir, RunDirError

        try:
            run = RunDir(run_dir)
            cfg = run.config()
            model = run.build_model(checkpoint, device=device, cfg=cfg)
            tokenizer = run.tokenizer()
        except RunDirError as err:
            raise RunLoadError(str(err)) from None
    else:
        cfg, model, tokenizer = _load_minimal(Path(run_dir), checkpoint, device)
    if cfg.get("quant") is not None:
        quant = instantiate(cfg.quant)
        quant.finalize(quant.prepare(model))
    return model.eval(), tokenizer


def _load_minimal(run: Path, checkpoint: str, device: str | torch.device) -> tuple[Any, Any, Any]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import bkexp.train.resolvers  # noqa: F401  (resolvers the config tree uses)
    from bkexp.train.flags import apply_flags, resolve_flags

    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        raise RunLoadError(f"{run} is not a run directory (no .hydra/config.yaml; was it written by python train.py?)")
    cfg = OmegaConf.load(config)
    if cfg.get("flags") is not None:
        apply_flags(cfg, resolve_flags(cfg)[0])
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    path = _checkpoint_path(run, checkpoint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - refused or unreadable: one line naming the file
        raise RunLoadError(f"{path}: cannot be loaded with torch.load(weights_only=True): "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    weights = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if not weights:
        raise RunLoadError(f"{path}: no 'model.*' weights in its state_dict")
    model.load_state_dict(weights, strict=True)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None:
        raise RunLoadError(f"{run}: dataset {cfg.dataset.get('name')!r} has no tokenizer to decode text with")
    return cfg, model.to(device), tokenizer


def _checkpoint_path(run: Path, which: str) -> Path:
    ckpts = run / "checkpoints"
    if which in ("best", "last"):
        best = sorted(ckpts.glob("best-*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        if which == "best" and best:
            return best[-1]
        if (ckpts / "last.ckpt").is_file():
            return ckpts / "last.ckpt"
        raise RunLoadError(f"{run}: no {which} checkpoint (expected checkpoints/best-*.ckpt or checkpoints/last.ckpt)")
    for candidate in (Path(which), run / which):
        if candidate.is_file():
            return candidate
    raise RunLoadError(f"checkpoint {which!r}: no such file (valid: best, last, or a path to a .ckpt)")
