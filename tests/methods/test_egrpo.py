"""E-GRPO's entity-credit reward, pinned by hand-computed cases."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.methods.egrpo import answer_atoms, entity_credit_reward, entity_rewards, match_rate
from mmgrpo.methods.registry import METHODS
from mmgrpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
NO_MODEL = "policy.options.path=/nonexistent/vlm"


def test_match_rate_and_answer_atoms():
    ents = ["red circle", "blue square", "Green  triangle!"]
    assert match_rate(ents, "<think>The red circle is left; a green triangle.</think>") == pytest.approx(2 / 3)
    assert match_rate(ents, "reddish circles") == 0.0  # whole words only
    assert match_rate([], "anything") == 0.0
    assert answer_atoms("B", {"options": ["0", "blue square", "2"]}) == ["blue", "square"]
    assert answer_atoms("the big dog", {}) == ["big", "dog"]


def test_entity_rewards_give_near_misses_partial_credit():
    # correct [T, F, F, F], gamma [0.5, 0.5, 0.25, 0] in one group: max gamma 0.5 -> gamma^ [1, 1, 0.5, 0]
    # r = [1, 0.3 * 1, 0.3 * 0.5, 0] = [1, 0.3, 0.15, 0]; unnormalised: [1, 0.15, 0.075, 0]
    correct = torch.tensor([True, False, False, False])
    gamma = torch.tensor([0.5, 0.5, 0.25, 0.0])
    group = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(entity_rewards(correct, gamma, group), torch.tensor([1.0, 0.3, 0.15, 0.0]))
    assert torch.allclose(entity_rewards(correct, gamma, group, group_normalize=False),
                          torch.tensor([1.0, 0.15, 0.075, 0.0]))  # fmt: skip
    # two groups normalise separately: group 1's max is 0.25
    two = entity_rewards(correct, gamma, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(two, torch.tensor([1.0, 0.3, 0.3, 0.0]))


def test_the_entity_credit_reward_on_completions():
    fn = entity_credit_reward()
    prompts = [{"question": "What colour is the square?", "options": ["red", "blue", "green", "yellow"]}] * 4
    meta = [{"answer": "B", "entities": ["red circle", "blue square"]}] * 4
    samples = [
        "<think>a red circle and a blue square</think><answer>B</answer>",  # correct: 1
        "<think>a red circle</think><answer>A</answer>",  # gamma 1/2 -> 1/2 / 1 (group max) * 0.3 = 0.15
        "<think>blue square, red circle</think><answer>C</answer>",  # gamma 1 -> 0.3
        "<answer>D</answer>",  # gamma 0 -> 0
    ]
    ctx = RewardContext(group_size=4, group=torch.zeros(4, dtype=torch.long))
    assert fn(samples, prompts, meta, ctx) == pytest.approx([1.0, 0.15, 0.3, 0.0])
    assert fn.last_metrics() == {"egrpo/near_miss": pytest.approx(2 / 3), "egrpo/match_rate": pytest.approx(0.625)}
    assert fn(samples[:1], prompts[:1], [{}], RewardContext(group_size=1))[0] is None  # no ground truth
    with pytest.raises(UserError, match="alpha=1.0"):
        entity_credit_reward(alpha=1.0)


def test_egrpo_is_a_registered_reward_switched_method():
    m = METHODS.get("egrpo")
    assert m.reward_switched and m.rewards == ("entity_credit",) and "2510.24694" in m.paper
    cfg = load_config(REPO / "configs" / "vlm_egrpo.yaml", [NO_MODEL])
    assert [r.name for r in cfg.rewards][:2] == ["format", "entity_credit"]
