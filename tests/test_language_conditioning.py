"""The instruction reaches the policy: standardized text features separate instructions that differ in one
word at init, a batch encodes each distinct string once with the same result, and a tiny policy fit on a
toy where only the instruction decides the action acts differently per instruction on one observation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaflow.errors import ConfigError  # noqa: E402
from vlaflow.policies import DiffusionConfig, build_policy  # noqa: E402
from vlaflow.policies.base_config import EncoderConfig, LanguageConfig, NetConfig, UNetConfig  # noqa: E402
from vlaflow.policies.nets.language import TextEncoder  # noqa: E402

pytest.importorskip("transformers")

PAIR = ("put the red cube in the tray", "put the blue cube in the tray")  # one word apart
OTHER = "put the green cube in the tray"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_config_checks():
    with pytest.raises(ConfigError, match="normalize"):
        LanguageConfig(normalize="batch")
    with pytest.raises(ConfigError, match="dropout"):
        LanguageConfig(dropout=1.0)


def test_standardized_features_separate_one_word_at_init():
    torch.manual_seed(0)
    raw = TextEncoder(LanguageConfig(enabled=True)).eval()
    torch.manual_seed(0)
    std = TextEncoder(LanguageConfig(enabled=True, normalize="instructions")).eval()
    with torch.no_grad():
        r = raw(list(PAIR), PAIR)  # "none" ignores the reference
        s = std(list(PAIR), PAIR)
        o = std([OTHER], PAIR)[0]
    # the diagnosis: mean-pooled features of an untrained tiny BERT are nearly parallel
    assert _cos(r[0], r[1]) > 0.98
    assert (r[0] - r[1]).norm() < 0.2 * r.norm(dim=1).mean()
    # standardized over the two instructions: opposite, each dimension at unit scale
    assert _cos(s[0], s[1]) < -0.99
    assert (s[0] - s[1]).norm() > 1.5 * np.sqrt(s.shape[1])
    # an unseen instruction stays bounded (the variance floor): no dimension blows up
    assert torch.isfinite(o).all() and o.abs().max() < 50


def test_each_distinct_string_encoded_once_same_features():
    torch.manual_seed(1)
    te = TextEncoder(LanguageConfig(enabled=True, normalize="instructions")).eval()
    texts = [PAIR[0], PAIR[1], PAIR[0], PAIR[0], PAIR[1]]
    with torch.no_grad():
        batched = te(texts, PAIR)
        one_by_one = torch.cat([te([t], PAIR) for t in texts])
        pooled = te.pooled(list(PAIR))
    torch.testing.assert_close(batched, one_by_one)
    assert torch.equal(batched[0], batched[2]) and torch.equal(batched[1], batched[4])
    # with fewer than two reference instructions the feature is the raw pooled one
    with torch.no_grad():
        torch.testing.assert_close(te([PAIR[0]], PAIR[:1])[0], pooled[0])


def _stats(lo, hi, d):
    lo_a, hi_a = np.full(d, lo, np.float32), np.full(d, hi, np.float32)
    return {
        "min": lo_a,
        "max": hi_a,
        "mean": (lo_a + hi_a) / 2,
        "std": np.full(d, (hi - lo) / 4, np.float32),
        "q01": lo_a,
        "q99": hi_a,
    }


def test_policy_follows_the_instruction_after_a_short_fit():
    """Toy: random state, action chunk +0.8 for one instruction and -0.8 for the other; after a short fit the
    policy's actions on the same observation and the same initial noise differ in sign by instruction."""
    torch.manual_seed(0)
    lang = LanguageConfig(
        enabled=True,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        dropout=0.0,
        normalize="instructions",
    )
    cfg = DiffusionConfig(
        obs_shapes={"obs.state": (6,)},
        n_obs_steps=2,
        horizon=8,
        n_action_steps=4,
        action_dim=2,
        num_inference_steps=5,
        encoder=EncoderConfig(
            state_encoder="mlp", state_hidden_dims=(32,), state_feature_dim=32, language=lang
        ),
        net=NetConfig(kind="unet", unet=UNetConfig(down_dims=(16, 32), kernel_size=3, n_groups=4)),
        sampler="ddim",
        tasks=PAIR,
    )
    policy = build_policy(cfg, {"obs.state": _stats(-1, 1, 6), "action": _stats(-1, 1, 2)})
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    b = 32
    policy.train()
    for _ in range(220):
        idx = torch.randint(0, 2, (b,), generator=g)
        sign = (1 - 2 * idx).float().view(b, 1, 1)
        batch = {
            "obs.state": torch.rand(b, 2, 6, generator=g) * 2 - 1,
            "action": 0.8 * sign.expand(b, 8, 2),
            "task_index": idx,
        }
        loss, _ = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    obs = torch.rand(4, 2, 6, generator=g) * 2 - 1
    noise = torch.randn(4, 8, 2, generator=g)
    with torch.no_grad():
        first = policy.sample({"obs.state": obs, "task": PAIR[0]}, noise=noise.clone())
        second = policy.sample({"obs.state": obs, "task": PAIR[1]}, noise=noise.clone())
    assert first.mean() > 0.3, first.mean()
    assert second.mean() < -0.3, second.mean()
