"""Recipe: text-to-image GRPO over any diffusion/flow family (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO).

    mmgrpo train configs/sd3_flow_grpo.yaml        # point policy.options.path at real weights

Prompts come from a prompt file (.txt one per line, .jsonl / .csv with a ``prompt`` column), a Hugging Face dataset
(``hf:NAME``) or the built-in shapes world (``data.options.prompts: shapes``); see docs/data.md. Held-out
evaluation samples the held-out prompts with the deterministic ODE sampler at fixed seeds and scores them with
``data.options.eval_reward`` (default: the first training reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core import progress
from mmgrpo.core.errors import bad_option
from mmgrpo.core.seeding import prompt_seed
from mmgrpo.core.types import RewardContext
from mmgrpo.data.prompts import PromptList, read_prompts
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.objectives import check_loss
from mmgrpo.train.components import PIPELINES, Components, EvalResult, Pipeline
from mmgrpo.train.config import Config, options_from


@dataclass
class PromptDataOptions:
    prompts: str = "shapes"
    """'shapes' (built-in world, train split), a .txt (one a line) / .jsonl / .csv prompt file, or
    hf:NAME_OR_PATH[:SPLIT[:COLUMN]] (docs/data.md)"""
    heldout_prompts: str = "shapes"
    """'shapes' (held-out split), a prompt file or hf: dataset as for prompts, or '' for no evaluation prompts"""
    eval_samples_per_prompt: int = 2
    """samples per held-out prompt at evaluation"""
    eval_max_prompts: int = 0
    """evaluate on at most this many held-out prompts (0 = all)"""
    eval_reward: str = ""
    """reward used for evaluation (default: the first training reward)"""
    eval_batch_size: int = 32
    """images per evaluation forward batch"""
    grid_images: int = 16
    """evaluation images shown in each saved grid"""
    split_seed: int = 0
    """seed of the shapes world's train/held-out split"""

    def __post_init__(self) -> None:
        # checked when the config loads (Pipeline.check), before the model does
        check_eval_numbers(self)
        if self.split_seed < 0:
            raise bad_option("data.options.split_seed", self.split_seed,
                             "a seed is an integer >= 0; set it to 0 or more")  # fmt: skip


def check_eval_numbers(data: Any) -> None:
    """The evaluation numbers of a generator recipe's ``data.options``: with samples per prompt < 1 an evaluation
    crashed (torch.cat of nothing), grid_images 0 divided by zero writing the grid, and a negative
    eval_max_prompts / grid_images silently dropped the last prompt / image (a slice [:-1])."""
    if data.eval_samples_per_prompt < 1:
        raise bad_option("data.options.eval_samples_per_prompt", data.eval_samples_per_prompt, "an evaluation "
                         "needs at least 1 sample per held-out prompt; set it to 1 or more, e.g. 2")  # fmt: skip
    if data.eval_max_prompts < 0:
        raise bad_option("data.options.eval_max_prompts", data.eval_max_prompts,
                         "must be >= 0; set it to 0 (all held-out prompts) or a count, e.g. 64")  # fmt: skip
    if data.grid_images < 1:
        raise bad_option("data.options.grid_images", data.grid_images,
                         "a saved grid shows at least 1 image; set it to 1 or more, e.g. 16")  # fmt: skip


def make_evaluator(prompts: list[str], data: PromptDataOptions, reward_fn: Any, reward_name: str, run_seed: int):
    """Evaluation: ODE samples of held-out prompts at fixed seeds, scored by the evaluation reward."""
    if data.eval_max_prompts:
        prompts = prompts[: data.eval_max_prompts]
    rows = [(p, j) for p in prompts for j in range(data.eval_samples_per_prompt)]
    seeds = [prompt_seed(run_seed, 10**9, i) for i in range(len(rows))]  # same seeds at every evaluation
    metas = [dict(getattr(p, "meta", None) or {}) for p, _ in rows]  # e.g. an image-to-video prompt's first frame

    def evaluate(policy: DiffusionPolicy, step: int) -> EvalResult:
        images = []
        for lo in progress.batches(len(rows), data.eval_batch_size, unit="sample"):
            chunk = rows[lo : lo + data.eval_batch_size]
            images.append(
                policy.generate([p for p, _ in chunk], seeds[lo : lo + len(chunk)], metas[lo : lo + len(chunk)])
            )
        imgs = torch.cat(images)
        texts = [p for p, _ in rows]
        ctx = RewardContext(group_size=data.eval_samples_per_prompt, step=step, update_state=False)
        scores = reward_fn(imgs, texts, metas, ctx)  # each row's meta, as training hands it to the reward
        scores = torch.as_tensor([float("nan") if s is None else s for s in scores], dtype=torch.float32)
        order = np.argsort([p for p, _ in rows], kind="stable")[: data.grid_images]
        return EvalResult(
            metrics={reward_name: float(torch.nanmean(scores))},
            images=imgs[torch.as_tensor(order)],
            captions=[texts[i] for i in order],
        )

    return evaluate


def generator_options(cfg: Config, accelerator: Any, policy_options: type, data_options: type) -> tuple[Any, Any, Any]:
    """The diffusion recipes' parsed ``policy.options`` (checked against the loss), ``data.options`` and device."""
    popts = options_from(policy_options, cfg.policy.options, "the config", "policy.options")
    check_loss(popts, cfg.loss.name)
    data = options_from(data_options, cfg.data.options, "the config", "data.options")
    return popts, data, accelerator.device if accelerator is not None else "cpu"


def eval_reward(cfg: Config, name: str):
    """The evaluation reward (``name``, default the first training reward) and its display name."""
    spec = next((r for r in cfg.rewards if r.name == name), cfg.rewards[0])
    name = name or spec.name
    return reward_registry.get(name, **(spec.options if spec.name == name else {})), name


def read_prompt_splits(data: PromptDataOptions) -> tuple[list[str], list[str]]:
    """The train and held-out prompts of ``data.options``."""
    train = read_prompts(data.prompts, "train", data.split_seed)
    return train, read_prompts(data.heldout_prompts, "heldout", data.split_seed)


def generator_components(
    cfg: Config, data: Any, policy: DiffusionPolicy, train: list[str], heldout: list[str], prompt_list=PromptList
) -> Components:
    """The diffusion recipes' components: ``train`` prompts streamed by ``prompt_list``, and, when there are
    ``heldout`` prompts, the ODE evaluation scored by the evaluation reward."""
    evaluate = None
    if heldout:
        fn, name = eval_reward(cfg, data.eval_reward)
        evaluate = make_evaluator(heldout, data, fn, name, cfg.run.seed)
    prompts = prompt_list(train, cfg.run.seed)
    return Components(policy=policy, prompts=prompts, evaluate=evaluate, sample_images=lambda s: s)


def build_text_to_image(cfg: Config, accelerator=None) -> Components:
    popts, data, device = generator_options(cfg, accelerator, GeneratorPolicyOptions, PromptDataOptions)
    splits = read_prompt_splits(data)  # the data first: a bad file is named before the weights load (minutes)
    policy = DiffusionPolicy(load_adapter(popts, device), popts)
    return generator_components(cfg, data, policy, *splits)


PIPELINES.add(
    "text_to_image",
    Pipeline(
        build=build_text_to_image,
        policy_options=GeneratorPolicyOptions,
        data_options=PromptDataOptions,
        description="text-to-image GRPO on SD3/FLUX/SD families with SDE exploration (DanceGRPO, Flow-GRPO, ...)",
    ),
)
