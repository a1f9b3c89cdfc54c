"""Training runs through the real entry point with ``bits`` < 32: QAT/PTQ runs record bits and policy, and
eval-quant at the run's own width reproduces the run's quantized test perplexity."""

from __future__ import annotations

import csv

import pytest
import yaml
from runhelpers import MQAR_TINY, TINY, read_summary
from testpaths import REPO_ROOT

from bkexp.cli import main as bkexp_main

WIRED = any(isinstance(d, dict) and "quant" in d
            for d in yaml.safe_load((REPO_ROOT / "conf" / "train.yaml").read_text())["defaults"])
pytestmark = pytest.mark.skipif(not WIRED, reason="conf/train.yaml has no `quant` default yet (issue 5 wiring)")


@pytest.mark.parametrize(("overrides", "method"), [(["bits=4"], "qat"), (["bits=4", "quant=ptq"], "ptq")],
                         ids=["auto-qat-4", "ptq-4"])
def test_quantized_run_records_policy_and_matches_eval_quant(train, overrides: list[str], method: str) -> None:
    run = train(*TINY, *MQAR_TINY, *overrides)
    summary = read_summary(run)
    assert summary["status"] == "ok" and summary["bits"] == 4
    quant = summary["quant"]
    assert quant["method"] == method and quant["bits"] == 4 and quant["active"] is True
    assert quant["quantized_params"] > 0 and quant["embeddings"] is False
    assert "nn.Linear inside the blocks" in quant["policy"]
    assert quant["quantized_by_parent"] == {"AttentionMixer": ["out_proj", "qkv"], "MLP": ["fc1", "fc2"]}
    assert quant["effective_size_bytes"] < 4 * quant["total_params"]
    assert bkexp_main(["eval-quant", str(run), "--bits", "4"]) == 0
    with (run / "quant_eval.csv").open(newline="") as f:
        rows = {int(r["bits"]): r for r in csv.DictReader(f)}
    # The run's test used exactly the weights eval-quant quantizes at 4 bits (QAT: the trained fake-quant
    # weights; PTQ: round-to-nearest of the best checkpoint) -- and not the float weights.
    assert float(rows[4]["test_ppl"]) == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-4)
    assert rows[4]["trained"] == f"{method}@4"
    assert float(rows[32]["test_ppl"]) != pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)


def test_invalid_combination_fails_the_run(train) -> None:
    with pytest.raises(ValueError, match=r"quant=qat needs bits in 16, 8, 4, 2"):
        train(*TINY, *MQAR_TINY, "quant=qat", "bits=32")
