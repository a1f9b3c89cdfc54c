"""Under DDP every example of an evaluation split is scored by exactly one process (two real gloo processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from bkexp.data import MQARDataModule

# One DDP rank: the evaluation loaders' rows of a small MQAR datamodule, as JSON on stdout (or the error).
RANK_SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from bkexp.data import MQARDataModule

dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
num_val, num_test = int(sys.argv[1]), int(sys.argv[2])
dm = MQARDataModule("mqar", seq_len=16, batch_size=2, vocab_size=32, num_kv_pairs=2, num_train=4,
                    num_val=num_val, num_test=num_test)
dm.setup()
out = {}
for split, make in (("validation", dm.val_dataloader), ("test", dm.test_dataloader)):
    try:
        out[split] = [row.tolist() for batch in make() for row in batch["input_ids"]]
    except ValueError as error:
        out[split] = {"error": str(error)}
print(json.dumps(out))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(num_val: int, num_test: int, world: int = 2) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(num_val), str(num_test)],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(world)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def test_every_evaluation_example_is_scored_by_exactly_one_ddp_process() -> None:
    # An odd validation split: Lightning's DistributedSampler would pad the second rank with a repeat of example 0.
    # A test split of one example: one rank would have nothing to evaluate.
    num_val = 5
    ranks = _run_ranks(num_val, num_test=1)
    dm = MQARDataModule("mqar", seq_len=16, batch_size=2, vocab_size=32, num_kv_pairs=2, num_train=4,
                        num_val=num_val, num_test=1)
    dm.setup()
    expected = dm.datasets["validation"].input_ids.tolist()
    assert len({tuple(row) for row in expected}) == num_val  # examples are told apart by their tokens
    assert sorted(row for rank in ranks for row in rank["validation"]) == sorted(expected)  # all, none twice
    assert ranks[0]["validation"] == expected[0::2] and ranks[1]["validation"] == expected[1::2]  # r, r + 2, ...
    for rank in ranks:
        error = rank["test"]["error"]
        assert "split 'test' has 1 example(s), fewer than the 2 DDP processes" in error
        assert "trainer.devices" in error


def test_a_single_process_evaluates_the_whole_split_in_order() -> None:
    dm = MQARDataModule("mqar", seq_len=16, batch_size=2, vocab_size=32, num_kv_pairs=2, num_train=4,
                        num_val=3, num_test=5)
    dm.setup()
    rows = torch.cat([batch["input_ids"] for batch in dm.test_dataloader()])
    assert torch.equal(rows, dm.datasets["test"].input_ids)
