"""The lm-eval adapter on local task files: multiple choice and rolling log-likelihood against direct scoring."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from bkexp.cli import main as bkexp_main  # noqa: E402
from bkexp.eval.cli import load_run  # noqa: E402
from bkexp.eval.harness import BkexpLM, write_local_task  # noqa: E402
from bkexp.eval.scoring import score_stream  # noqa: E402

MC = [{"query": "The game was released in", "choices": ["Japan", "the", "of"], "gold": 0},
      {"query": "He was born in", "choices": ["the", "1990", "and"], "gold": 1},
      {"query": "The album", "choices": ["was", "of", "<unk>"], "gold": 0},
      {"query": "In the", "choices": ["season", "film", "game"], "gold": 2}]
DOCS = [{"text": "The game was released in Japan .\nIt was a commercial success ."},
        # 96 tokens: three full windows of max_length 32 (lm_eval gives a last, partial window more context)
        {"text": " = Valkyria Chronicles = \n" + "The album was recorded in 1995 and the band toured . " * 8
         + "in Japan ."}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def choice_loglik(model, tokenizer, context: str, choice: str) -> float:
    ctx, whole = tokenizer.encode(context), tokenizer.encode(context + " " + choice)
    x = torch.tensor(whole[:-1])[None]
    with torch.no_grad():
        logp = F.log_softmax(model(x).float(), -1)[0]
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


@pytest.mark.slow  # lm_eval's evaluation loop takes ~30 s even on four documents
def test_local_multiple_choice_and_rolling_tasks_match_direct_scoring(word_run: Path, tmp_path: Path, capsys):
    tasks = tmp_path / "tasks"
    write_local_task(tasks, "wt_mc", "multiple_choice", write_jsonl(tmp_path / "mc.jsonl", MC))
    write_local_task(tasks, "wt_ppl", "rolling", write_jsonl(tmp_path / "docs.jsonl", DOCS))
    assert bkexp_main(["eval", str(word_run), "--tasks", "wt_mc,wt_ppl", "--include-path", str(tasks)]) == 0
    record = json.loads((word_run / "eval" / "lm_eval.json").read_text())
    metrics = {(r["task"], r["metric"]): r for r in record["metrics"]}

    run = load_run(word_run, "best", (), torch.device("cpu"))
    predicted = [max(range(3), key=lambda k: choice_loglik(run.model, run.tokenizer, d["query"], d["choices"][k]))
                 for d in MC]
    expected_acc = sum(p == d["gold"] for p, d in zip(predicted, MC)) / len(MC)
    assert metrics[("wt_mc", "acc")]["value"] == pytest.approx(expected_acc)
    assert metrics[("wt_mc", "acc")]["stderr"] is not None and metrics[("wt_mc", "acc")]["n"] == 4

    # Rolling log-likelihood = the stream scorer on [end-of-line] + document in disjoint windows of max_length.
    eol = run.tokenizer.encode_lines([""]).tolist()
    total_nll = 0.0
    for doc in DOCS:
        stream = torch.tensor(eol + run.tokenizer.encode(doc["text"]))
        assert stream.numel() - 1 in (14, 96)
        total_nll += score_stream(run.model, stream, run.train_len, measure_memory=False).loss_sum
    words = sum(len(re.split(r"\s+", d["text"])) for d in DOCS)  # lm_eval's word count (edge spaces count)
    assert metrics[("wt_ppl", "word_perplexity")]["value"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)
    n_bytes = sum(len(d["text"].encode()) for d in DOCS)
    assert metrics[("wt_ppl", "bits_per_byte")]["value"] == pytest.approx(total_nll / n_bytes / math.log(2), rel=1e-4)
    assert "| wt_mc | acc |" in (word_run / "eval" / "lm_eval.md").read_text()


class Request:
    def __init__(self, *args) -> None:
        self.args = args


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(word_run: Path):
    run = load_run(word_run, "best", (), torch.device("cpu"))
    lm = BkexpLM(model=run.model, tokenizer=run.tokenizer, max_length=32, device="cpu")
    context = "The game was released in"
    ids = run.tokenizer.encode(context)
    with torch.no_grad():  # reference: the full forward, arg-max, one token at a time
        for _ in range(6):
            ids.append(int(run.model(torch.tensor(ids)[None])[0, -1].argmax()))
    expected = run.tokenizer.decode(ids[len(run.tokenizer.encode(context)):])
    free, = lm.generate_until([Request(context, {"max_gen_toks": 6})])
    assert free == expected
    stop = expected.split()[2]
    cut, = lm.generate_until([Request(context, {"max_gen_toks": 6, "until": [stop]})])
    assert cut == expected.split(stop, 1)[0]


def test_generate_until_batches_requests_and_keeps_their_order(word_run: Path):
    """Requests of several lengths and two settings, decoded in batches of 2, each equal to its own greedy
    reference (full forward, one token at a time) and returned in request order."""
    run = load_run(word_run, "best", (), torch.device("cpu"))
    lm = BkexpLM(model=run.model, tokenizer=run.tokenizer, max_length=32, batch_size=2, device="cpu")
    contexts = ["The game was released in", "The game", "It was", "The game was released in", "It was the"]
    budgets = [4, 6, 4, 6, 4]

    def greedy(context: str, steps: int) -> str:
        ids = run.tokenizer.encode(context)
        with torch.no_grad():
            for _ in range(steps):
                ids.append(int(run.model(torch.tensor(ids)[None])[0, -1].argmax()))
        return run.tokenizer.decode(ids[len(run.tokenizer.encode(context)):])

    outs = lm.generate_until([Request(c, {"max_gen_toks": k}) for c, k in zip(contexts, budgets)])
    assert outs == [greedy(c, k) for c, k in zip(contexts, budgets)]
    assert outs[0] != outs[3]  # same context, different budgets: two groups, not one cached answer
    # lm_eval passes model_args as strings; 0 decodes on the process's threads
    on_all = BkexpLM(model=run.model, tokenizer=run.tokenizer, max_length=32, batch_size=2, device="cpu",
                     decode_threads="0")
    assert on_all.generate_until([Request(c, {"max_gen_toks": k}) for c, k in zip(contexts, budgets)]) == outs
    for bad in ("-1", "two"):
        with pytest.raises(ValueError, match=f"decode_threads must be 'auto' or an integer >= 0 .*got '{bad}'"):
            BkexpLM(model=run.model, tokenizer=run.tokenizer, device="cpu", decode_threads=bad)


def test_bad_task_files_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="task kind 'essay'; valid: multiple_choice, rolling"):
        write_local_task(tmp_path, "t", "essay", tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        write_local_task(tmp_path, "t", "rolling", tmp_path / "x.jsonl")
    # lm_eval would read these only when the task runs, and fail in a Jinja template after loading the model
    bad_lines = [
        ("multiple_choice", {"question": "Q", "choices": ["a", "b"], "answer": 0},
         r"line 2: missing 'query', 'gold' \(it has: 'question', 'choices', 'answer'\)"),
        ("multiple_choice", {"query": "Q", "choices": ["a", "b"], "gold": 2},
         r"line 2: 'gold' must be the index of the answer in choices \(0 to 1\), got 2"),
        ("multiple_choice", {"query": "Q", "choices": "a b", "gold": 0}, "'choices' must be a list of at least two"),
        ("rolling", {"text": ""}, "line 2: 'text' must be a non-empty string"),
        ("rolling", ["text"], "line 2: a JSON object was expected, got list"),
    ]
    for kind, line, message in bad_lines:
        good = MC[0] if kind == "multiple_choice" else DOCS[0]
        data = write_jsonl(tmp_path / "bad.jsonl", [good, line])
        with pytest.raises(ValueError, match=message):
            write_local_task(tmp_path / "tasks", "t", kind, data)
    (tmp_path / "broken.jsonl").write_text(json.dumps(DOCS[0]) + "\n{text: 1}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        write_local_task(tmp_path / "tasks", "t", "rolling", tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        write_local_task(tmp_path / "tasks", "t", "rolling", tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="task name 'my task'"):
        write_local_task(tmp_path / "tasks", "my task", "rolling", write_jsonl(tmp_path / "ok.jsonl", DOCS))
    assert not (tmp_path / "tasks").exists()  # nothing written for a refused task
    # the command says so and exits 2
    assert bkexp_main(["eval", "make-task", "t", "--kind", "rolling", "--data", str(tmp_path / "empty.jsonl"),
                       "--out", str(tmp_path / "tasks")]) == 2
    assert write_local_task(tmp_path / "tasks", "t", "rolling", tmp_path / "ok.jsonl").is_file()


@pytest.mark.slow  # indexes every built-in lm_eval task
def test_unknown_tasks_are_refused_before_evaluation(word_run: Path, capsys):
    assert bkexp_main(["eval", str(word_run), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown task(s) ['no_such_task_xyz']" in capsys.readouterr().err


@pytest.mark.slow  # two fresh interpreters, lm_eval's own command line
def test_lm_eval_command_line_finds_the_bkexp_model_after_install(word_run: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    from testpaths import REPO_ROOT

    env = {**os.environ, "PYTHONUSERBASE": str(tmp_path / "userbase"), "PYTHONPATH": str(REPO_ROOT),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    data = write_jsonl(tmp_path / "mc.jsonl", MC)
    for args in (["make-task", "cli_mc", "--kind", "multiple_choice", "--data", str(data), "--out", str(tmp_path / "t")],
                 ["install-lm-eval", "--user"]):
        done = subprocess.run([sys.executable, "-m", "bkexp.cli", "eval", *args], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "userbase").rglob("bkexp-lm-eval.pth")
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "bkexp", "--model_args", f"run={word_run}",
                           "--tasks", "cli_mc", "--include_path", str(tmp_path / "t"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cli_mc" in done.stdout and "acc" in done.stdout


def test_the_user_start_up_file_works_before_the_system_site_packages_load(tmp_path: Path):
    # Python reads the user site-packages first, before the editable install's finder is in place: the file must
    # not need `import bkexp` at start-up, and must not import it (nor touch sys.path) for every interpreter.
    import os
    import subprocess
    import sys
    import sysconfig

    from bkexp.eval.lm_eval_hook import PTH_NAME, pth_text

    userbase = tmp_path / "userbase"
    site_dir = Path(sysconfig.get_path("purelib", f"{os.name}_user", vars={"userbase": str(userbase)}))
    site_dir.mkdir(parents=True)
    (site_dir / PTH_NAME).write_text(pth_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUSERBASE": str(userbase)}
    probe = ("import sys; print('bkexp' in sys.modules, "
             "any(type(f).__name__ == '_RegistryFinder' for f in sys.meta_path), len(sys.path))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    without = subprocess.run([sys.executable, "-c", "import sys; print(len(sys.path))"], cwd=tmp_path,
                             env={**env, "PYTHONUSERBASE": str(tmp_path / "empty")}, capture_output=True, text=True)
    # bkexp not imported, the finder waiting for lm_eval's registry, and no sys.path entry beyond the user site
    assert done.stdout.split() == ["False", "True", str(int(without.stdout) + 1)]
