"""Streaming datasets (json/jsonl/parquet/txt through HF datasets) and token caches written by ``bkexp prepare-data``.

The in-memory TextDataModule is the reference: streamed documents must give token for token the same chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from bkexp.data import ByteTokenizer, StreamingTextDataModule, TextDataModule, WordTokenizer, text_datamodule
from bkexp.data.prepare import main as prepare_main
from bkexp.data.token_cache import ShardedTokens, read_meta
from runhelpers import TINY, read_summary

SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}


def documents(lines: list[str], per_doc: int = 7) -> list[str]:
    """Consecutive lines grouped into multi-line documents (each ends without a newline)."""
    return ["\n".join(lines[i:i + per_doc]) for i in range(0, len(lines), per_doc)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same text as .txt (one file per split), .jsonl (one document per row) and .parquet (two shards)."""
    from testpaths import WIKITEXT2_DIR

    out = tmp_path_factory.mktemp("stream_corpus")
    lines = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split("\n")[:420]
    parts = {"train": lines[:280], "validation": lines[280:350], "test": lines[350:420]}
    for split, stem in SPLIT_FILES.items():
        docs = documents(parts[split])
        (out / f"{stem}.txt").write_text("".join(d + "\n" for d in docs), encoding="utf-8")
        with open(out / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            for i, doc in enumerate(docs):
                f.write(json.dumps({"id": i, "text": doc}) + "\n")
        half = len(docs) // 2
        for shard, rows in enumerate((docs[:half], docs[half:])):
            pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), out / f"{stem}-{shard}.parquet")
    return out


def files(ext: str) -> dict[str, str]:
    return {s: (f"{stem}-*.parquet" if ext == "parquet" else f"{stem}.{ext}") for s, stem in SPLIT_FILES.items()}


def build(corpus: Path, ext: str, streaming: bool | str = "auto", **kw) -> object:
    args = {"name": "text", "seq_len": 32, "batch_size": 4, "tokenizer": ByteTokenizer(), "data_dir": str(corpus),
            "files": files(ext), **kw}
    dm = text_datamodule(streaming=streaming, **args)
    dm.setup("fit")
    return dm


def chunks(dataset) -> list[tuple[list[int], list[int]]]:
    items = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    return [(c["input_ids"].tolist(), c["labels"].tolist()) for c in items]


@pytest.mark.parametrize("ext", ["txt", "jsonl", "parquet"])
def test_streamed_chunks_equal_the_in_memory_chunks(corpus: Path, ext: str) -> None:
    reference = build(corpus, "txt", streaming=False)
    assert isinstance(reference, TextDataModule)
    streamed = build(corpus, ext, streaming=True if ext == "txt" else "auto")
    assert isinstance(streamed, StreamingTextDataModule)
    for split in ("train", "validation", "test"):
        assert chunks(streamed.datasets[split]) == chunks(reference.datasets[split]), split
    assert streamed.describe()["reading"] == {s: "stream" for s in SPLIT_FILES}


def test_eval_chunks_bound_validation_and_test(corpus: Path) -> None:
    dm = build(corpus, "jsonl", eval_chunks=5)
    full = build(corpus, "jsonl")
    assert chunks(dm.datasets["validation"]) == chunks(full.datasets["validation"])[:5]
    assert len(chunks(dm.datasets["test"])) == 5 and len(chunks(dm.datasets["train"])) > 5


def test_stateful_loader_resumes_at_the_next_batch(corpus: Path) -> None:
    dm = build(corpus, "parquet")
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it) for _ in range(7)]  # crosses the first parquet shard's documents into the second
    state = loader.state_dict()
    expected = [next(it)["input_ids"] for _ in range(3)]
    fresh = build(corpus, "parquet").train_dataloader()
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    assert all(torch.equal(next(resumed)["input_ids"], e) for e in expected)
    assert not torch.equal(seen[0]["input_ids"], expected[0])


@pytest.mark.slow  # worker processes take ~10 s to start on 2 cores
def test_workers_read_disjoint_shards(corpus: Path) -> None:
    dm = build(corpus, "parquet")
    per_shard = []
    for shard in range(2):
        one = build(corpus, "parquet")
        one.source.data_files["train"] = [str(corpus / f"train-{shard}.parquet")]
        one.datasets.clear()
        one.setup("fit")
        per_shard += chunks(one.datasets["train"])
    loader = DataLoader(dm.datasets["train"], batch_size=None, num_workers=2)
    together = [(c["input_ids"].tolist(), c["labels"].tolist()) for c in loader]
    assert sorted(together) == sorted(per_shard)  # each worker packs its own shard; nothing read twice


def test_streaming_refuses_a_fitted_vocabulary_and_unknown_files(corpus: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer=byte or tokenizer=gpt2"):
        StreamingTextDataModule(name="text", seq_len=32, batch_size=4, tokenizer=WordTokenizer(),
                                data_dir=str(corpus), files=files("jsonl"))
    with pytest.raises(FileNotFoundError, match=r"dataset.files.train='nope-\*.jsonl' matches no file"):
        StreamingTextDataModule(name="text", seq_len=32, batch_size=4, tokenizer=ByteTokenizer(),
                                data_dir=str(corpus), files={**files("jsonl"), "train": "nope-*.jsonl"})
    with pytest.raises(ValueError, match=r"unknown extension '.csv'"):
        text_datamodule(name="text", seq_len=32, batch_size=4, tokenizer=ByteTokenizer(), data_dir=str(corpus),
                        files={**files("jsonl"), "train": "train.csv"})
    dm = build(corpus, "jsonl", text_field="body")
    with pytest.raises(KeyError, match=r"no text column 'body' \(columns: \['id', 'text'\]\)"):
        next(iter(dm.datasets["train"]))


@pytest.mark.parametrize("dataset", ["c4", "pile"])
def test_hub_streams_offline_fail_at_once_with_the_local_alternative(dataset: str, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from runhelpers import compose_train

    cfg = compose_train([f"dataset={dataset}", "tokenizer=byte"], tmp_path)
    datamodule = instantiate(cfg.dataset)  # splits with a token cache would train offline
    with pytest.raises(RuntimeError, match=r"the hub is offline \(.*\), and its train split has no token cache to "
                                           r"read instead.*dataset=text dataset.data_dir=DIR.*bkexp prepare-data"):
        datamodule.setup("fit")  # in run(), before the model is built


@pytest.mark.slow  # prepare-data, a run and an evaluation
def test_a_hub_dataset_trains_and_evaluates_offline_from_its_token_caches(corpus: Path, tmp_path: Path, train,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Compute nodes without internet: `bkexp prepare-data` where the hub is reachable, then train and evaluate
    offline from the caches. A folder stands in for the hub repository (datasets.load_dataset streams a local
    folder the same way); with a proxy set bkexp skips its reachability probe, and a dead one fails any request."""
    from bkexp.cli import main as bkexp_main

    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    for ours, theirs in (("train", "train"), ("valid", "validation")):
        (hub / f"{theirs}.jsonl").write_text((corpus / f"{ours}.jsonl").read_text())
    dataset = ["dataset=c4", "tokenizer=byte", "seq_len=32", f"dataset.hub.path={hub}", "dataset.hub.name=null",
               "dataset.eval_chunks=3"]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert prepare_main([*dataset, f"paths.root_dir={tmp_path}"]) == 0

    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from here on, the hub is offline
    run = train(*dataset, *[o for o in TINY if not o.startswith("seq_len")])
    summary = read_summary(run)
    assert summary["status"] == "ok" and all(r.startswith("cache:") for r in summary["data"]["reading"].values())
    assert bkexp_main(["eval", str(run), "--out", str(tmp_path / "eval")]) == 0
    (own,) = json.loads((tmp_path / "eval" / "perplexity.json").read_text())["datasets"]
    assert own["source"]["kind"] == "token-cache" and own["targets"] == 3 * 32
    assert own["ppl"] == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)
    assert own["shares_data_with"] == ["validation"]  # C4's test split is its validation split
    # its export reads the same caches (config.json records the dataset and its token_cache folder)
    from bkexp.export import export_run

    folder = export_run(run, tmp_path / "export")
    assert bkexp_main(["eval", str(folder)]) == 0
    (exported,) = json.loads((folder / "eval" / "perplexity.json").read_text())["datasets"]
    assert exported["source"] == own["source"] and exported["ppl"] == own["ppl"]
    assert exported["shares_data_with"] == ["validation"]


def _prepare(corpus: Path, root: Path, *extra: str) -> int:
    return prepare_main(["dataset=text", "tokenizer=byte", "seq_len=32", f"paths.root_dir={root}",
                         f"dataset.data_dir={corpus}", *(f"dataset.files.{s}={f}" for s, f in files("jsonl").items()),
                         "dataset.docs_per_batch=4", *extra])


def test_prepare_data_writes_a_cache_that_resumes_and_matches_the_stream(corpus: Path, tmp_path: Path) -> None:
    # interrupted preparation: stopped after the first shards, then the same command finishes it
    assert _prepare(corpus, tmp_path / "a", "--splits", "train", "--shard-tokens", "4000", "--max-tokens", "4000") == 0
    (partial,) = (tmp_path / "a" / "data" / "tokens").iterdir()
    assert read_meta(partial)["exhausted"] is False
    assert _prepare(corpus, tmp_path / "a", "--shard-tokens", "4000") == 0
    assert _prepare(corpus, tmp_path / "b", "--shard-tokens", "4000") == 0  # uninterrupted
    caches = {p.name: p for p in (tmp_path / "a" / "data" / "tokens").iterdir()}
    assert sorted(caches) == sorted(p.name for p in (tmp_path / "b" / "data" / "tokens").iterdir())
    assert {n.split("-")[1] for n in caches} == {"train", "validation", "test"}
    for name, directory in caches.items():
        meta = read_meta(directory)
        assert meta["exhausted"] and meta["dtype"] == "uint16"
        for shard in meta["shards"]:
            other = tmp_path / "b" / "data" / "tokens" / name / shard["file"]
            assert (directory / shard["file"]).read_bytes() == other.read_bytes()
    train_meta = read_meta(caches[next(n for n in caches if "-train-" in n)])
    assert len(train_meta["shards"]) > 2

    # a run with the same source and tokenizer reads the cache: the same chunks as streaming
    cached = build(corpus, "jsonl", token_cache=str(tmp_path / "a" / "data" / "tokens"))
    streamed = build(corpus, "jsonl", token_cache=None)
    assert all(r.startswith("cache:") for r in cached.describe()["reading"].values())
    for split in ("train", "validation", "test"):
        assert isinstance(cached.datasets[split].stream, ShardedTokens)
        assert chunks(cached.datasets[split]) == chunks(streamed.datasets[split]), split
    # validation and test read their first eval_chunks chunks from a cache as from the stream (the cache's whole
    # split until 2026-12-05: a run with a cache and one without were tested on different tokens)
    capped = build(corpus, "jsonl", token_cache=str(tmp_path / "a" / "data" / "tokens"), eval_chunks=2)
    capped_stream = build(corpus, "jsonl", token_cache=None, eval_chunks=2)
    for split in ("validation", "test"):
        assert capped.describe()["reading"][split].startswith("cache:")
        assert len(chunks(capped.datasets[split])) == 2
        assert chunks(capped.datasets[split]) == chunks(capped_stream.datasets[split]), split
    # chunks are cut when read, so one cache serves every seq_len; a changed source file is another key
    longer = build(corpus, "jsonl", token_cache=str(tmp_path / "a" / "data" / "tokens"), seq_len=64)
    assert longer.describe()["reading"]["train"].startswith("cache:")
    assert chunks(longer.datasets["train"]) == chunks(build(corpus, "jsonl", seq_len=64).datasets["train"])
    (corpus / "test.jsonl").touch()
    changed = build(corpus, "jsonl", token_cache=str(tmp_path / "a" / "data" / "tokens"))
    assert changed.describe()["reading"]["test"] == "stream"
    assert changed.describe()["reading"]["train"].startswith("cache:")


def test_prepare_data_refuses_in_memory_datasets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare_main(["dataset=mqar", f"paths.root_dir={tmp_path}"]) == 2
    assert "token caches are for streamed datasets" in capsys.readouterr().err
    assert prepare_main(["dataset=text", "--splits", "train,dev"]) == 2
    assert "unknown split(s) ['dev']" in capsys.readouterr().err
    assert prepare_main(["dataset=c4", "tokenizer=byte", f"paths.root_dir={tmp_path}"]) == 2  # the hub is offline
    assert "streams allenai/c4 from the Hugging Face hub, but the hub is offline" in capsys.readouterr().err
    assert not (tmp_path / "data" / "tokens").exists()


def test_a_run_streams_jsonl_end_to_end(train, corpus: Path) -> None:
    run = train("dataset=text", "tokenizer=byte", f"dataset.data_dir={corpus}",
                *(f"dataset.files.{s}={f}" for s, f in files("jsonl").items()), "dataset.eval_chunks=8", *TINY)
    summary = read_summary(run)
    assert summary["status"] == "ok", summary["error"]
    assert summary["data"]["streaming"] is True and summary["data"]["reading"]["train"] == "stream"
    assert summary["metrics"]["test/loss"] > 0 and summary["tokens"]["train"] > 0
