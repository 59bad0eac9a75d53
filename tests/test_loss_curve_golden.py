"""The training loop reproduces, step for step, the loss curve the loop of commit d3264fd gave.

``tests/data/loss_curve_v1.json`` was written before the issue-11 refactor by
``benchmarks/loop_equivalence.py`` (its ``train_command`` says how): the PushT diffusion preset on the
206 human demos with a narrower U-Net and batch 32 for 40 steps, one torch thread. The same run through
today's loop must give the same per-step loss (the log keeps 6 significant digits). The full preset's
300-step comparison is ``benchmarks/results/loop_equivalence.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from vlaflow.cli import main

GOLDEN = json.loads((Path(__file__).resolve().parent / "data" / "loss_curve_v1.json").read_text())


def test_loss_curve_matches_the_pre_refactor_loop(pusht_store, tmp_path):
    before = GOLDEN["curves"]["before"]
    cmd = before["train_command"].split()
    assert cmd[:2] == ["vlaflow", "train"]
    args = cmd[2:]
    args[args.index("--data") + 1] = str(pusht_store)
    args[args.index("--out") + 1] = str(tmp_path / "run")
    assert main(["train", *args]) == 0
    with open(tmp_path / "run" / "log.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh) if r["kind"] == "train"]
    assert len(losses) == len(before["loss"]) == 40
    np.testing.assert_allclose(losses, before["loss"], rtol=2e-5, atol=0)
