"""Recipe: the categorical bandit (the smallest runnable recipe; see configs/bandit.yaml).

P prompts, each with A arms of fixed values drawn from ``value_seed`` (one best arm worth 1, the others
in [0, 0.8]); reward = the chosen
arm's value (reward ``bandit_arm_value``). Evaluation reports the expected reward of the current policy
and how often its most likely arm is the best arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmgrpo.core.errors import bad_option
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.bandit import BanditPolicy, BanditPolicyOptions
from mmgrpo.train.components import PIPELINES, Components, EvalResult, Pipeline
from mmgrpo.train.config import Config, options_from


@dataclass
class BanditDataOptions:
    num_prompts: int = 8
    """P: number of distinct prompts (bandit states)"""
    num_arms: int = 6
    """A: arms per prompt"""
    value_seed: int = 1234
    """seed of the arm values"""

    def __post_init__(self) -> None:
        # checked when the config loads (Pipeline.check), before anything is built
        if self.num_prompts < 1:
            raise bad_option(
                "data.options.num_prompts",
                self.num_prompts,
                "a bandit needs at least 1 prompt (state); set it to 1 or more, e.g. 8",
            )
        if self.num_arms < 2:
            raise bad_option(
                "data.options.num_arms",
                self.num_arms,
                "a bandit needs at least 2 arms (with one there is nothing to choose); set it to 2 or more, e.g. 6",
            )
        if self.value_seed < 0:
            raise bad_option(
                "data.options.value_seed", self.value_seed, "a seed is an integer >= 0; set it to 0 or more, e.g. 1234"
            )


class BanditPrompts:
    """Stream position i -> prompt (i mod P), in a fresh seeded permutation for every pass over the P prompts."""

    def __init__(self, num_prompts: int, num_arms: int, value_seed: int, order_seed: int):
        rng = np.random.default_rng(value_seed)
        # arm values in [0, 0.8] and one best arm worth 1.0 per prompt: a clear gap of >= 0.2 to find
        self.values = rng.uniform(0.0, 0.8, size=(num_prompts, num_arms)).round(4)
        self.values[np.arange(num_prompts), rng.integers(0, num_arms, size=num_prompts)] = 1.0
        self.num_prompts = num_prompts
        self.order_seed = order_seed

    def __len__(self) -> int:
        """P: stream positions 0 .. P - 1 are each prompt once."""
        return self.num_prompts

    def prompt_at(self, i: int) -> int:
        epoch, pos = divmod(i, self.num_prompts)
        perm = np.random.default_rng([self.order_seed, epoch]).permutation(self.num_prompts)
        return int(perm[pos])

    def get(self, indices: list[int]) -> PromptBatch:
        ids = [self.prompt_at(i) for i in indices]
        meta = [{"arm_values": self.values[p].tolist(), "best_arm": int(self.values[p].argmax())} for p in ids]
        return PromptBatch(prompts=ids, meta=meta)


def build_bandit(cfg: Config, accelerator=None) -> Components:
    data = options_from(BanditDataOptions, cfg.data.options, "the config", "data.options")
    popts = options_from(BanditPolicyOptions, cfg.policy.options, "the config", "policy.options")
    prompts = BanditPrompts(data.num_prompts, data.num_arms, data.value_seed, cfg.run.seed)
    policy = BanditPolicy(data.num_prompts, data.num_arms, popts, seed=cfg.run.seed)
    values = torch.tensor(prompts.values, dtype=torch.float32)

    def evaluate(policy: BanditPolicy, step: int) -> EvalResult:
        probs = policy.probs()  # [P, A]
        expected = (probs * values).sum(-1).mean().item()
        greedy_best = (probs.argmax(-1) == values.argmax(-1)).float().mean().item()
        return EvalResult(metrics={"expected_reward": expected, "best_arm_rate": greedy_best})

    return Components(policy=policy, prompts=prompts, evaluate=evaluate)


PIPELINES.add(
    "bandit",
    Pipeline(
        build=build_bandit,
        policy_options=BanditPolicyOptions,
        data_options=BanditDataOptions,
        description="categorical bandit: the smallest recipe, for testing the loop (configs/bandit.yaml)",
        group_keys=True,  # each row's prompt is its stratum
    ),
)
