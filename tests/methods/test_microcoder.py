"""MicroCoder-GRPO: conditional truncation masking and the diversity-determined temperature by hand."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
NO_MODEL = "policy.options.path=/nonexistent/vlm"


def test_conditional_truncation_masking_by_hand():
    from mmgrpo.methods.microcoder import mask_truncated

    adv = torch.tensor([[1.0, -0.5, -0.5, 0.25]])
    finished = torch.tensor([[False, False, True, False]])
    # conditional: only the truncated row with A < 0 (row 1) is zeroed; the truncated row 0 keeps its credit
    assert torch.equal(mask_truncated(adv, finished), torch.tensor([[1.0, 0.0, -0.5, 0.25]]))
    assert torch.equal(mask_truncated(adv, finished, "all"), torch.tensor([[0.0, 0.0, -0.5, 0.0]]))
    assert torch.equal(mask_truncated(adv, finished, "off"), adv)


class _TempStub:
    """A policy whose G rows are all different at temperature >= 1, all equal below; a scorer with a temperature."""

    def __init__(self):
        self.options = type("O", (), {"temperature": 1.0})()
        self.model = type("S", (), {"temperature": 1.0})()
        self.calls = []

    def rollout(self, batch, group_size, generator=None):
        t = self.options.temperature
        self.calls.append(t)
        n = len(batch) * group_size
        samples = [f"s{i}" if t >= 1.0 else "same" for i in range(n)]
        return Rollout(samples=samples, logp_old=torch.zeros(n, 1), train_mask=torch.ones(n, 1, dtype=torch.bool),
                       group_size=group_size, prompts=["p"] * n, meta=[{}] * n)  # fmt: skip


def test_the_temperature_is_chosen_by_diversity_and_kept_as_state():
    from mmgrpo.methods.microcoder import MicroCoderPolicy, choose_temperature, group_diversity

    assert group_diversity(["a", "a", "b", "c"], 2) == 0.75  # (1/2 + 2/2) / 2
    assert choose_temperature({0.6: 0.5, 0.8: 0.8, 1.0: 0.9}, 0.75) == 0.8
    assert choose_temperature({0.6: 0.1, 0.8: 0.2}, 0.75) == 0.8  # none reaches the target: the largest
    inner = _TempStub()
    pol = MicroCoderPolicy(inner, [0.5, 1.0, 1.5], target=0.75, every=0)
    batch = PromptBatch(["q"], [{}], seeds=[1], step=0)
    out = pol.rollout(batch, 4)
    assert inner.calls == [0.5, 1.0, 1.5, 1.0] and pol.chosen == (1.0, 1.0, 0)  # 0.5: 1/4 distinct; 1.0: 4/4
    assert inner.model.temperature == 1.0 and len(set(out.samples)) == 4
    pol.rollout(PromptBatch(["q"], [{}], seeds=[2], step=1), 4)
    assert inner.calls[-1] == 1.0 and len(inner.calls) == 5  # chosen once (reselect_every 0)
    state = pol.training_state()
    fresh_inner = _TempStub()
    fresh = MicroCoderPolicy(fresh_inner, [0.5, 1.0, 1.5], target=0.75, every=0)
    fresh.load_training_state(state)
    assert fresh.chosen == pol.chosen and fresh_inner.options.temperature == 1.0 == fresh_inner.model.temperature
    fresh.rollout(PromptBatch(["q"], [{}], seeds=[3], step=5), 4)
    assert fresh_inner.calls == [1.0]  # resumed: no new probing


def test_microcoder_options_are_checked_at_load():
    base = [NO_MODEL]
    cfg = load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.microcoder={}"])
    assert "microcoder" in cfg.methods
    with pytest.raises(UserError, match="set loss.beta=0"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.microcoder={}", "loss.beta=0.01"])
    with pytest.raises(UserError, match="clip_high >= 0.28"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml",
                    [*base, "methods.microcoder={}", "loss.options.clip_high=0.2"])  # fmt: skip
    with pytest.raises(UserError, match="mask_truncated=true"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml",
                    [*base, "methods.microcoder={}", "policy.options.mask_truncated=true"])  # fmt: skip
    with pytest.raises(UserError, match="not pipeline 'bandit'"):
        load_config(REPO / "configs" / "bandit.yaml", ["methods.microcoder={}"])
    # the candidates replace policy.options.temperature, bypassing its 0.01..100 (1e-45 passed: non-finite log-probs)
    with pytest.raises(UserError, match=r"temperatures=\[0.6, 1e-45\] must all be in 0.01..100"):
        load_config(
            REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.microcoder={temperatures: [0.6, 1e-45]}"]
        )
