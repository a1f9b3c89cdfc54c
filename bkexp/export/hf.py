"""A run as a Hugging Face model folder: safetensors weights, config.json, tokenizer files and a model card.

``export_run(RUN_DIR, OUT)`` writes::

    OUT/model.safetensors     the weights of the run's best checkpoint (tied tensors stored once)
    OUT/config.json           what rebuilds the model: the run's model (and quant) config, vocab size, seq_len, bits
    OUT/tokenizer_config.json ... the run's tokenizer/ folder (vocab.txt / tokenizer.json where it has one)
    OUT/README.md             model card (huggingface_hub ModelCard) generated from summary.json

``from_pretrained(OUT)`` rebuilds the model from config.json alone and loads the weights strictly (no missing or
unexpected key), so its logits equal those of the run's checkpoint; ``load_tokenizer(OUT)`` rebuilds the tokenizer.
Both also take a hub repository id (``from_pretrained("me/bkexp-bk", revision=...)``), downloaded into the hub
cache by :class:`bkexp.rundir.ModelFolder`, which ``bkexp generate``, ``bkexp eval`` and lm_eval read too.
``push(OUT, REPO_ID)`` uploads exactly the files of ``upload_operations(OUT)`` in one commit; the token comes from
the environment (``HF_TOKEN``) or the local login and is never written into the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bkexp.rundir import MODEL_CONFIG_FILE, MODEL_TYPE, MODEL_WEIGHTS_FILE, ModelFolder, RunDirError
from bkexp.utils import atomic_write_text

CARD_FILE = "README.md"


class ExportError(ValueError):
    """A run that cannot be exported, or a folder that is not a bkexp export; the message says why."""


def export_run(run_dir: str | Path, out: str | Path, which: str = "best", overwrite: bool = False,
               repo_id: str | None = None) -> Path:
    """Write the Hugging Face folder of one finished run (see the module docstring); returns ``out``.

    ``repo_id``: the hub repository the folder is for; the model card's usage lines name it."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from bkexp.rundir import TOKENIZER_DIR, RunDir

    run = RunDir(run_dir)
    summary = run.summary()
    if summary.get("status") != "ok":
        raise ExportError(f"{run.path}: status {summary.get('status')!r} (error: {summary.get('error')}); only "
                          "finished runs (status 'ok') are exported")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    cfg = run.config()
    checkpoint = run.checkpoint_path(which)
    model = run.build_model(which=which, cfg=cfg)
    config = {
        "model_type": MODEL_TYPE,
        "architectures": [type(model).__name__],
        "bkexp_version": _version(),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "quant": OmegaConf.to_container(cfg.quant, resolve=True) if cfg.get("quant") is not None else None,
        "vocab_size": run.vocab_size(cfg),
        "seq_len": cfg.get("seq_len"),
        "bits": cfg.get("bits"),
        # where the run's data came from, so `bkexp eval MODEL --datasets run` and the held-out checks find it
        "dataset": _resolved(cfg.get("dataset")),
        "optimizer": _resolved(cfg.get("optimizer")),  # the training step `bkexp bench run MODEL` times
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "source": {"run": run.name, "checkpoint": checkpoint.name},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        with torch.no_grad():
            save_model(model, str(staging / MODEL_WEIGHTS_FILE), metadata={"format": "pt", "bkexp_run": run.name})
        atomic_write_text(staging / MODEL_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        tokenizer_dir = run.path / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise ExportError(f"{run.path}: no {TOKENIZER_DIR}/ folder (runs save their tokenizer there since "
                              "bkexp records it); re-run the training to export it")
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file():
                shutil.copy2(file, staging / file.name)
        from bkexp.export.card import model_card

        model_card(summary, config, **({"folder_hint": repo_id} if repo_id else {})).save(staging / CARD_FILE)
        for file in staging.iterdir():
            os.chmod(file, 0o644)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)  # the folder appears complete or not at all
        os.chmod(out, 0o755)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _resolved(node: Any) -> Any:
    """A config node as plain data with its interpolations resolved; None when absent or not resolvable here."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if node is None:
        return None
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return None


@contextmanager
def _as_export_error() -> Iterator[None]:
    """This module's error for what bkexp.rundir refuses (a folder that is not a bkexp export, weights that do not
    fit, a hub repository that cannot be read)."""
    try:
        yield
    except RunDirError as err:
        raise ExportError(str(err)) from None


def read_config(folder: str | Path) -> dict[str, Any]:
    """A local model folder's config.json (ExportError when the folder is not a bkexp export)."""
    if not Path(folder).is_dir():
        raise ExportError(f"{folder}: no such folder; not a model folder written by `bkexp export`")
    with _as_export_error():
        return ModelFolder(folder).info


def from_pretrained(folder: str | Path, device: str = "cpu", revision: str | None = None) -> Any:
    """The exported model rebuilt from config.json, weights loaded strictly, in eval mode.

    ``folder``: a folder written by ``bkexp export``, or a hub repository id (``revision``: its branch, tag or
    commit). Built by ``bkexp.rundir.build_run_model``, the path ``RunDir.build_model`` takes: a quantized run
    comes back with its quantization switched on, as its test evaluated it.
    """
    with _as_export_error():
        return ModelFolder.open(folder, revision).build_model(device)


def load_tokenizer(folder: str | Path, revision: str | None = None) -> Any:
    """The run's tokenizer, from the tokenizer files of the folder (or hub repository)."""
    with _as_export_error():
        return ModelFolder.open(folder, revision).tokenizer()


def upload_operations(folder: str | Path) -> list[Any]:
    """Exactly what ``push`` uploads: one ``CommitOperationAdd`` per file of the folder (no hidden files)."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    read_config(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                            for part in p.relative_to(folder).parts))
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Upload the folder to the hub repository ``repo_id`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    from bkexp.data.tokenizers import hub_unavailable

    operations = upload_operations(folder)  # validates the folder before any network access
    why = hub_unavailable()
    if why is not None:
        raise ExportError(f"cannot push to {repo_id}: {why}. The folder {folder} is complete; upload it later with "
                          f"`huggingface-cli upload {repo_id} {folder}` or `bkexp export RUN --out {folder} --push {repo_id}`")
    api = HfApi()  # token: HF_TOKEN or the `huggingface-cli login` cache; never written to the folder
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(repo_id, operations=operations, revision=revision, repo_type="model",
                             commit_message=f"bkexp export of run {read_config(folder)['source']['run']}")
    return str(info.commit_url)


def _version() -> str:
    import bkexp

    return bkexp.__version__
