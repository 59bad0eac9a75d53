"""Backward compatibility: checkpoints saved before the issue-11 refactor load and sample as they did.

``tests/data/golden_v1/`` holds one tiny checkpoint per family, written by commit d3264fd
(``make_golden.py`` there says how), and the chunks that commit sampled from a fixed observation and noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaflow.policies import load_checkpoint

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_v1"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
FAMILIES = ("diffusion", "flow", "consistency", "ebt", "composed")


def test_every_family_has_a_golden_checkpoint():
    assert sorted(EXPECTED["families"]) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_checkpoint_loads_and_samples_as_before(family):
    policy = load_checkpoint(GOLDEN / family)
    assert policy.config.family == family
    obs = {k: torch.tensor(v) for k, v in EXPECTED["obs"].items()}
    noise = torch.tensor(EXPECTED["noise"])
    row = EXPECTED["families"][family]
    with torch.no_grad():
        got = policy.sample(obs, noise=noise.clone())
        np.testing.assert_allclose(got.numpy(), np.asarray(row["sample"]), rtol=1e-5, atol=1e-3)
        if "sample_ddpm" in row:
            ddpm = policy.sample(obs, noise=noise.clone(), sampler="ddpm")
            np.testing.assert_allclose(ddpm.numpy(), np.asarray(row["sample_ddpm"]), rtol=1e-5, atol=1e-3)
