"""The lm-evaluation-harness (``lm_eval`` 0.4.x) adapter: a trained bkexp run as the registered model ``bkexp``.

``bkexp eval RUN --tasks copa,my_local_task`` runs tasks in-process; ``lm_eval --model bkexp --model_args
run=RUN_DIR[,checkpoint=best,max_length=256,batch_size=16,decode_threads=auto] --tasks ...`` does the same from
lm_eval's own CLI once the registration hook is installed (``bkexp eval install-lm-eval``, see
:mod:`bkexp.eval.lm_eval_hook`); ``pretrained=FOLDER_OR_HUB_ID[,revision=...]`` instead of ``run=`` reads a
model written by ``bkexp export`` (lm_eval's Hugging Face model takes the same key).

Text is tokenised with the run's own tokenizer (``Tokenizer.encode``: a newline is the tokenizer's end-of-line
token, as in training). A request longer than ``max_length`` (default: the training ``seq_len``) keeps its
last ``max_length`` tokens, as lm_eval's Hugging Face model does. ``loglikelihood_rolling`` scores documents in
disjoint windows of ``max_length`` tokens with the end-of-line token as the first context. ``generate_until``
decodes with :func:`bkexp.infer.generate` (prefill/step: constant cost per token for BK and Mamba).

Local tasks: ``bkexp/eval/tasks`` holds base configs for multiple-choice and rolling-perplexity tasks that read
JSON lines from local files (``dataset_path: json``, ``dataset_kwargs.data_files``); :func:`write_local_task`
(``bkexp eval make-task``) writes a task YAML for a data file. The built-in GLUE / SuperGLUE / SQuAD / MMLU
tasks download from the Hugging Face hub and run unchanged where it is reachable (docs/eval.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra
    raise ImportError("lm-evaluation-harness is not installed: pip install -e '.[eval]' (lm_eval 0.4.x)") from err

from bkexp.threads import DECODE_THREADS, thread_option

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_KINDS = {"multiple_choice": "_bkexp_multiple_choice.yaml", "rolling": "_bkexp_rolling.yaml"}


@register_model("bkexp")
class BkexpLM(TemplateLM):
    """A bkexp run (or a model + tokenizer) answering lm_eval's log-likelihood requests.

    Args:
        run: run directory; its model, tokenizer and checkpoint are rebuilt as for ``bkexp eval``.
        checkpoint: ``best``, ``last`` or a path (with ``run``).
        pretrained: instead of ``run``, a model folder written by ``bkexp export`` or a hub repository id of one.
        revision: with a hub ``pretrained``: branch, tag or commit.
        model, tokenizer: an ``nn.Module`` returning logits ``(B, N, V)`` and a bkexp tokenizer, instead of ``run``.
        max_length: longest input in tokens (default: the run's training ``seq_len``; 1024 without a run).
        batch_size: requests per forward.
        decode_threads: CPU threads of ``generate_until``'s token-by-token steps (``auto``, N, or 0: the
            process's count; ``bkexp.infer.generate``).
    """

    def __init__(self, run: str | None = None, checkpoint: str | None = None, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, max_length: int | None = None, batch_size: int | str = 16,
                 device: str | None = None, decode_threads: int | str = DECODE_THREADS, pretrained: str | None = None,
                 revision: str | None = None, **unused: Any) -> None:
        super().__init__()
        from bkexp.devices import resolve_device

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes --device cuda by default, also on machines without a GPU
            log.warning("bkexp lm_eval model: device %s is not available, using the CPU", device)
            device = "cpu"
        self._device = resolve_device(device or "auto")
        if run is not None and pretrained is not None:
            raise ValueError(f"the bkexp lm_eval model takes run= or pretrained=, not both (run={run!r}, "
                             f"pretrained={pretrained!r})")
        self.run_dir = run or pretrained
        if self.run_dir is not None:
            from bkexp.eval.cli import load_run
            from bkexp.rundir import ModelFolder

            source = Path(run) if run is not None else ModelFolder.open(pretrained, revision)
            loaded = load_run(source, checkpoint, (), self._device, training_data=False)
            model, tokenizer = loaded.model, loaded.tokenizer
            max_length = max_length or loaded.train_len
        if model is None or tokenizer is None:
            raise ValueError("the bkexp lm_eval model needs run=RUN_DIR or pretrained=FOLDER_OR_HUB_ID (or model= "
                             "and tokenizer= objects)")
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self._max_length = int(max_length or 1024)
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self._decode_threads = thread_option(decode_threads, "decode_threads")
        self._eot = end_of_line_id(tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce the continuation."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i} has an empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length={self.max_length}")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]  # context loses its start
            prepared.append((i, tokens[:-1], list(continuation)))
        order = sorted(prepared, key=lambda item: -len(item[1]))  # similar lengths share a batch
        for first in range(0, len(order), self._batch_size):
            batch = order[first : first + self._batch_size]
            width = len(batch[0][1])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                input_ids[row, : len(inp)] = torch.tensor(inp)  # right padding: a causal model ignores it
            logprobs = F.log_softmax(self.model(input_ids.to(self._device)).float(), dim=-1).cpu()
            for row, (index, inp, cont) in enumerate(batch):
                span = logprobs[row, len(inp) - len(cont) : len(inp)]
                target = torch.tensor(cont)
                total = float(span.gather(1, target[:, None]).double().sum())
                results[index] = (total, bool((span.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(score for score, _ in scores))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations through bkexp.infer's prefill/step decoding, cut
        at the first ``until`` string; the context keeps its last ``max_length`` tokens. Requests with the same
        generation settings are decoded together, ``batch_size`` prompts of one length per batch."""
        from bkexp.infer import Sampling, cut_at_until, generate, until_stop

        groups: dict[tuple[tuple[str, ...], int, Sampling], list[int]] = {}
        prompts: list[list[int]] = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            sampling = Sampling(temperature=float(kwargs.pop("temperature", 1.0)) if sample else 0.0,
                                top_k=kwargs.pop("top_k", None), top_p=float(kwargs.pop("top_p", 1.0)))
            groups.setdefault((tuple(until), max_new, sampling), []).append(i)
            prompts.append((self.tok_encode(context) if context else [self.prefix_token_id])[-self.max_length:])
        out = [""] * len(requests)
        for (until, max_new, sampling), indices in groups.items():
            continuations = generate(self.model, [prompts[i] for i in indices], max_new, sampling,
                                     stop=until_stop(self.tokenizer, until), batch_size=self._batch_size,
                                     decode_threads=self._decode_threads)
            for i, tokens in zip(indices, continuations, strict=True):
                out[i] = cut_at_until(self.tok_decode(tokens), until)
        return out

    def get_model_info(self) -> dict[str, Any]:
        return {"bkexp_run": self.run_dir, "max_length": self.max_length,
                "tokenizer": self.tokenizer.describe()}


def end_of_line_id(tokenizer: Any) -> int:
    """The end-of-line token: lm_eval's end-of-text / empty-context token for bkexp tokenizers."""
    tail = tokenizer.encode_lines([""]).tolist()
    if len(tail) != 1:
        raise ValueError(f"tokenizer {tokenizer.describe()} ends a line with {len(tail)} tokens, expected one")
    return tail[0]


# ----------------------------------------------------------------------------- local tasks
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# What each line of a local task's JSON-lines file holds (the fields its base YAML's templates read).
TASK_FIELDS = {"multiple_choice": '{"query": str, "choices": [str, str, ...], "gold": index into choices}',
               "rolling": '{"text": str}'}


def _line_problem(doc: Any, kind: str) -> str | None:
    """What is wrong with one parsed line of a ``kind`` task file (None: nothing)."""
    if not isinstance(doc, dict):
        return f"a JSON object was expected, got {type(doc).__name__}"
    need = ("query", "choices", "gold") if kind == "multiple_choice" else ("text",)
    missing = [key for key in need if key not in doc]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)} (it has: {', '.join(map(repr, doc)) or 'nothing'})"
    if kind == "rolling":
        return None if isinstance(doc["text"], str) and doc["text"] else "'text' must be a non-empty string"
    choices, gold = doc["choices"], doc["gold"]
    if not isinstance(doc["query"], str):
        return "'query' must be a string"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return "'choices' must be a list of at least two strings"
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        return f"'gold' must be the index of the answer in choices (0 to {len(choices) - 1}), got {gold!r}"
    return None


def check_task_data(data_file: Path, kind: str) -> int:
    """The number of documents in a local task's JSON-lines file; raises ``ValueError`` naming the first bad line.

    lm_eval reads the file only when the task runs, and a missing field then surfaces as a Jinja
    ``UndefinedError`` from deep inside it, after the model has loaded.
    """
    documents = 0
    with open(data_file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                problem = _line_problem(json.loads(line), kind)
            except json.JSONDecodeError as exc:
                problem = f"not JSON ({exc.msg})"
            if problem is not None:
                raise ValueError(f"task data {data_file}, line {number}: {problem}; each line of a {kind} task is "
                                 f"{TASK_FIELDS[kind]}")
            documents += 1
    if documents == 0:
        raise ValueError(f"task data {data_file}: no documents; each line of a {kind} task is {TASK_FIELDS[kind]}")
    return documents


def write_local_task(out_dir: Path, name: str, kind: str, data_file: Path) -> Path:
    """A task YAML ``out_dir/NAME.yaml`` that runs the base config of ``kind`` on the JSON-lines ``data_file``."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind {kind!r}; valid: {', '.join(TASK_KINDS)}")
    if not TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use letters, digits, '_', '-' and '.' (it names the file "
                         f"{name}.yaml and is what --tasks takes)")
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(f"task data {data_file}: no such file (JSON lines, see {TASKS_DIR / TASK_KINDS[kind]})")
    check_task_data(data_file, kind)
    import yaml

    from bkexp.utils import atomic_write_text

    config = {"task": name, "include": str(TASKS_DIR / TASK_KINDS[kind]),
              "dataset_kwargs": {"data_files": {"test": str(data_file)}}}
    path = Path(out_dir) / f"{name}.yaml"
    atomic_write_text(path, f"# {kind} task on {data_file} (written by bkexp eval make-task)\n"
                      + yaml.safe_dump(config, sort_keys=False))
    return path


def run_tasks(run: Any, tasks: str, include_paths: Sequence[Path], num_fewshot: int | None, limit: float | None,
              device: torch.device, batch_size: int = 16) -> dict[str, Any]:
    """lm_eval's ``simple_evaluate`` on a loaded run; returns the record written to ``eval/lm_eval.json``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"--include-path {path}: no such folder")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = None
    if include_paths:  # indexing lm_eval's thousands of built-in YAMLs takes a while: only when needed
        manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
    if manager is None or not all(manager.match_tasks([t]) for t in names):
        manager = TaskManager(include_path=[str(p) for p in include_paths] or None)
    missing = [t for t in names if not manager.match_tasks([t])]
    if missing:
        raise ValueError(f"--tasks: unknown task(s) {missing}; local tasks need --include-path DIR (write one with "
                         "bkexp eval make-task); `lm_eval ls tasks` lists the built-in ones")
    lm = BkexpLM(model=run.model, tokenizer=run.tokenizer, max_length=run.train_len, batch_size=batch_size,
                 device=str(device))
    lm.run_dir = str(run.run_dir)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=1000)
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "n": results.get("n-samples", {}).get(task, {}).get("effective")})
    return {"run_dir": str(Path(run.run_dir).resolve()), **({"model_source": run.source} if run.source else {}),
            "model": run.name, "checkpoint": str(run.checkpoint),
            "max_length": lm.max_length, "tasks": names, "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": lm_eval.__version__, "metrics": rows,
            "results": json.loads(json.dumps(results["results"], default=str)),
            "n_samples": results.get("n-samples"), "versions": results.get("versions")}


def write_lm_eval(out: Path, record: dict[str, Any]) -> Path:
    import pandas as pd

    from bkexp.eval.cli import origin_md
    from bkexp.utils import atomic_write_text

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    rows = [{k: clean(v) for k, v in r.items()} for r in record["metrics"]]
    atomic_write_text(out / "lm_eval.json", json.dumps(record, indent=2, default=str) + "\n")
    atomic_write_text(out / "lm_eval.csv", pd.DataFrame(rows).to_csv(index=False))
    lines = [f"# lm-evaluation-harness: {record['model']}", "",
             f"{origin_md(record)}, lm_eval "
             f"{record['lm_eval_version']}, max_length {record['max_length']}, few-shot {record['num_fewshot']}.", "",
             "| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for r in rows:
        value = r["value"]
        lines.append(f"| {r['task']} | {r['metric']} | {value:.4g} | "
                     f"{'-' if r['stderr'] is None else format(r['stderr'], '.3g')} | {r['n']} |"
                     if isinstance(value, (int, float)) else f"| {r['task']} | {r['metric']} | {value} | - | {r['n']} |")
    path = out / "lm_eval.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
