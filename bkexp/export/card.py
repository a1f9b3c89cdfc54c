"""The model card (README.md) of an exported run, generated from its summary.json with huggingface_hub's ModelCard.

Every number in the card is copied from summary.json (nothing is recomputed), so the card says what the run measured.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from bkexp import config_env
from bkexp.held_out import OVERLAP_COLUMN, OVERLAP_N, caveats, record_pairs, short_caveat

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

Trained with bkexp (`python train.py {{ overrides }}`), exported from run `{{ run }}`
(checkpoint `{{ checkpoint }}`).

## Model

| | |
| --- | --- |
{% for key, value in model_rows %}| {{ key }} | {{ value }} |
{% endfor %}
## Training data and budget

| | |
| --- | --- |
{% for key, value in data_rows %}| {{ key }} | {{ value }} |
{% endfor %}
## Results

| metric | value |
| --- | --- |
{% for key, value in result_rows %}| {{ key }} | {{ value }} |
{% endfor %}{% for caveat in caveats %}
**Caveat:** {{ caveat }}.
{% endfor %}
## Reproduce

```bash
{{ command }}
```

Library versions: {{ versions }}.

## Use

```python
from bkexp.export import from_pretrained, load_tokenizer

model = from_pretrained("{{ folder_hint }}")      # config.json + model.safetensors, strict load
tokenizer = load_tokenizer("{{ folder_hint }}")
ids = tokenizer.encode_lines(["the quick brown fox"]).unsqueeze(0)
logits = model(ids)                                 # (1, N, vocab_size), causal
```
{% if text_model %}
From the command line, with bkexp installed (a hub repository's files download into the Hugging Face cache):

```bash
bkexp generate {{ folder_hint }} --prompt "the quick brown fox" --max-new-tokens 40
bkexp eval {{ folder_hint }} --datasets run --lengths {{ lengths }}   # the training data's test split
bkexp eval {{ folder_hint }} --datasets text:my_corpus.txt              # any text, with this tokenizer
bkexp eval install-lm-eval && lm_eval --model bkexp --model_args pretrained={{ folder_hint }} --tasks lambada_openai
```
{% endif %}"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, str) and value in {"inf", "nan", "-inf"}:
        return value
    return str(value)


def model_card(summary: dict[str, Any], config: dict[str, Any], folder_hint: str = "path/to/export") -> Any:
    """A ``huggingface_hub.ModelCard`` for the exported run (``.save(path)`` writes README.md)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model_cfg = config["model"]
    data = summary.get("data") or {}
    source = data.get("source") or {}
    metrics = summary.get("metrics") or {}
    params = summary.get("params") or {}
    env = summary.get("env") or {}
    tokenizer = data.get("tokenizer") or {}
    mixer = (model_cfg.get("mixer") or {}).get("_target_", "").rsplit(".", 1)[-1]
    name = summary.get("model") or model_cfg.get("name")
    dataset = summary.get("dataset") or data.get("name")
    hub_dataset = source.get("path") if str(source.get("kind", "")).startswith("hub") else None
    test_ppl = metrics.get("test/ppl")
    overlap = record_pairs(data)
    test_held_out = not any("test" in pair for pair in overlap)

    eval_results = []  # the card's machine-readable results, which leaderboards read: held-out numbers only
    if isinstance(test_ppl, (int, float)) and math.isfinite(test_ppl) and test_held_out:
        eval_results.append(EvalResult(task_type="text-generation", dataset_type=hub_dataset or str(dataset),
                                       dataset_name=str(dataset), dataset_split="test", metric_type="perplexity",
                                       metric_value=float(test_ppl)))
    card_data = ModelCardData(
        library_name="bkexp", model_name=f"bkexp-{name}-{dataset}", pipeline_tag="text-generation",
        tags=["bkexp", str(name), f"seq_len-{summary.get('seq_len')}", f"bits-{summary.get('bits')}", "causal-lm"],
        datasets=[hub_dataset] if hub_dataset else None, eval_results=eval_results or None,
        metrics=["perplexity"] + (["accuracy"] if "test/acc" in metrics else []),
    )
    model_rows = [
        ("architecture", f"{name} ({mixer} mixer, {model_cfg.get('n_layers')} layers, d_model {model_cfg.get('d_model')})"),
        ("parameters (total)", _fmt(params.get("total"))),
        ("parameters (non-embedding)", _fmt(params.get("non_embedding"))),
        ("state size per token", _fmt(summary.get("state_size"))),
        ("weight bits", _fmt(summary.get("bits"))),
        ("quantization", _fmt((summary.get("quant") or {}).get("method", (config.get("quant") or {}).get("method")))),
        ("causality checked before training", _fmt(summary.get("causality_checked"))),
        ("vocabulary", _fmt(config.get("vocab_size"))),
        ("FLOPs per token (forward)", _fmt((summary.get("flops") or {}).get("forward_per_token"))),
    ]
    splits = data.get("splits") or {}
    config_steps = ((summary.get("config") or {}).get("trainer") or {}).get("max_steps")
    data_rows = [
        ("dataset", f"{dataset} ({_describe_source(source)})"),
        *((f"{split} split", value) for split, value in _split_sources(source).items()),
        ("tokenizer", _fmt(tokenizer.get("name"))),
        ("sequence length", _fmt(summary.get("seq_len"))),
        # the defaults `python train.py` applied beyond the overrides in the command (the default MQAR experiment)
        ("recipe (conf/recipe/)", str(summary.get("recipe") or "none")),
        ("training tokens seen", _fmt((summary.get("tokens") or {}).get("train"))),
        ("optimizer steps", _fmt(summary.get("steps"))),
        ("training split tokens", _fmt((splits.get("train") or {}).get("tokens"))),
        ("seed", _fmt(summary.get("seed"))),
    ]
    for split in ("validation", "test"):  # text of the evaluation splits that also occurs in the training split
        share = (splits.get(split) or {}).get(OVERLAP_COLUMN)
        if isinstance(share, float):
            data_rows.append((f"{split} {OVERLAP_N}-grams also in training", f"{share:.2%}"))
    stopped = summary.get("stopped_early")
    if stopped:  # trained on less than its configured budget
        data_rows.append(("stopped early", f"at step {stopped['step']} of {_fmt(config_steps)}: {stopped['message']}"))
    result_rows = [(k, _fmt(metrics[k])) for k in ("test/ppl", "test/loss", "test/acc", "best/val_ppl",
                                                    "val/ppl", "val/acc") if k in metrics]
    result_rows.append(("wall time (s)", _fmt(summary.get("wall_time_s"))))
    result_rows.append(("device", _fmt(env.get("device") or summary.get("device"))))
    overrides = " ".join(shlex.quote(o) for o in summary.get("overrides") or [])
    # the environment variables the config read (e.g. BKEXP_SHARED_DATA: where the data was), as they were set
    variables = "".join(f"{name}={shlex.quote(value)} " for name, value in config_env.recorded(summary).items()
                        if value is not None)
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "lightning", "hydra") if env.get(k))
    versions += f", bkexp {config.get('bkexp_version')}" + (f" (commit {env['git_commit']})" if env.get("git_commit")
                                                            else "")
    description = (f"A {name} language model ({_fmt(params.get('total'))} parameters) trained on {dataset} at "
                   f"sequence length {summary.get('seq_len')} and {summary.get('bits')}-bit weights"
                   + (f"; test perplexity {_fmt(test_ppl)}" if test_ppl is not None else "")
                   + ("" if test_held_out or test_ppl is None else f" ({short_caveat(overlap)}, not held out)") + ".")
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, title=f"bkexp {name} on {dataset}", description=description,
        overrides=overrides, run=config["source"]["run"], checkpoint=config["source"]["checkpoint"],
        model_rows=model_rows, data_rows=data_rows, result_rows=result_rows, caveats=caveats(overlap),
        command=f"{variables}python train.py {overrides}".strip(), versions=versions, folder_hint=folder_hint,
        text_model=tokenizer.get("name") not in (None, "ids"),
        lengths=",".join(str(n * summary["seq_len"]) for n in (1, 2, 4)) if summary.get("seq_len") else "256,512")


def _split_sources(source: dict[str, Any]) -> dict[str, str]:
    """What each split read: its local file(s) or its hub split; empty for synthetic data."""
    per_split = source.get("files") or source.get("splits") or {}
    return {split: ", ".join(f"`{Path(f).name}`" for f in ([files] if isinstance(files, str) else files))
            for split, files in per_split.items()}


def _describe_source(source: dict[str, Any]) -> str:
    kind = source.get("kind")
    if kind in ("hub", "hub-stream"):
        return f"hub {source.get('path')}" + (f" / {source['name']}" if source.get("name") else "")
    if kind == "synthetic":
        params = ", ".join(f"{k}={v}" for k, v in source.items() if k not in {"kind", "task"})
        return f"synthetic {source.get('task')}: {params}"
    return f"{kind} files" if kind else "n/a"
