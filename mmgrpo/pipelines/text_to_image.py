"""Recipe: text-to-image GRPO over any diffusion/flow family (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO).

    mmgrpo train configs/sd3_flow_grpo.yaml        # point policy.options.path at real weights

Prompts come from a prompt file (.txt one per line, .jsonl / .csv with a ``prompt`` column), a Hugging Face dataset
(``hf:NAME``) or the built-in shapes world (``data.options.prompts: shapes``); see docs/data.md. Held-out
evaluation samples the held-out prompts with the deterministic ODE sampler at fixed seeds and scores them with
``data.options.eval_reward`` (default: the first training reward).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core import progress
from mmgrpo.core.errors import bad_option, quoted
from mmgrpo.core.seeding import prompt_seed
from mmgrpo.core.types import RewardContext
from mmgrpo.data.prompts import PromptList, decoded_meta, read_prompts
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.objectives import check_loss
from mmgrpo.train.components import PIPELINES, Components, EvalResult, Pipeline
from mmgrpo.train.config import Config, options_from
from mmgrpo.train.scoring import call_reward


@dataclass
class PromptDataOptions:
    prompts: str | list[str] = "shapes"
    """'shapes' (built-in world, train split), a .txt (one a line) / .jsonl / .csv prompt file,
    hf:NAME_OR_PATH[:SPLIT[:COLUMN]], or the prompts themselves, a list of texts (docs/data.md)"""
    heldout_prompts: str | list[str] = "shapes"
    """'shapes' (held-out split), a prompt file, hf: dataset or list of texts as for prompts, or '' for no
    evaluation prompts"""
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
        # an empty spec was "no training prompts" once the run built, after the model loaded
        if not (self.prompts if isinstance(self.prompts, list) else self.prompts.strip()):
            raise bad_option("data.options.prompts", self.prompts, "give the training prompts: 'shapes', a prompt "
                             "file (.txt, .jsonl, .csv), hf:NAME or a list of texts (docs/data.md); only "
                             "data.options.heldout_prompts may be '' (no evaluation)")  # fmt: skip
        for key in ("prompts", "heldout_prompts"):
            given = getattr(self, key)
            blank = [i for i, text in enumerate(given) if not text.strip()] if isinstance(given, list) else []
            if blank:
                raise bad_option(f"data.options.{key}", given, f"its item {blank[0]} is empty; every prompt of a "
                                 "list is a non-empty text")  # fmt: skip
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
    """Evaluation: ODE samples of held-out prompts at fixed seeds, scored by the evaluation reward.

    Batch by batch: each batch of whole groups (``eval_samples_per_prompt`` rows a prompt, so a group-aware reward
    sees its groups, ``ctx.group`` set as in training) is sampled, scored through the trainer's checks (a reward's
    exception or non-finite value names it) and dropped, but for the rows the grid shows, kept on the host: memory
    does not grow with the number of held-out prompts. Each row's meta (an image-to-video prompt's first frame)
    reaches the sampler and the reward, as in training."""
    if data.eval_max_prompts:
        prompts = prompts[: data.eval_max_prompts]
    S = data.eval_samples_per_prompt
    rows = [(p, j) for p in prompts for j in range(S)]
    texts = [p for p, _ in rows]
    seeds = [prompt_seed(run_seed, 10**9, i) for i in range(len(rows))]  # same seeds at every evaluation
    metas = [decoded_meta(p) for p in texts]
    order = np.argsort(texts, kind="stable")[: data.grid_images]  # the rows the grid shows, sorted by prompt
    shown = {int(i): k for k, i in enumerate(order)}
    size = max(S, data.eval_batch_size // S * S)  # whole groups a batch

    def evaluate(policy: DiffusionPolicy, step: int) -> EvalResult:
        scores, grid = [], [None] * len(order)
        for lo in progress.batches(len(rows), size, unit="sample"):
            hi = min(lo + size, len(rows))
            imgs = policy.generate(texts[lo:hi], seeds[lo:hi], metas[lo:hi])
            ctx = RewardContext(group_size=S, step=step, group=torch.arange(hi - lo) // S, update_state=False)
            where = f"in the evaluation of step {step}"
            scores.append(call_reward(reward_name, reward_fn, imgs, texts[lo:hi], metas[lo:hi], ctx, where))
            for i in range(lo, hi):
                if i in shown:
                    grid[shown[i]] = imgs[i - lo].detach().float().cpu()
        return EvalResult(
            metrics={reward_name: float(torch.nanmean(torch.cat(scores)))},
            images=torch.stack(grid),
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
    """The train and held-out prompts of ``data.options``; warns when the evaluation would score prompts the policy
    trains on, or when a run on its own prompts is evaluated on the default shapes-world prompts."""
    train = read_prompts(data.prompts, "train", data.split_seed)
    heldout = read_prompts(data.heldout_prompts, "heldout", data.split_seed)
    if data.prompts != "shapes" and data.heldout_prompts == "shapes":
        warnings.warn(f"data.options.prompts={quoted(data.prompts, 80)} but heldout_prompts is the default "
                      "'shapes': the evaluation scores the shapes world's held-out prompts; set "
                      "data.options.heldout_prompts to your held-out prompts, or '' for no evaluation",
                      stacklevel=2)  # fmt: skip
    seen = set(train)
    both = [p for p in heldout if p in seen]
    if both:
        warnings.warn(f"{len(both)} of the {len(heldout)} held-out prompts are training prompts too (the first: "
                      f"{str(both[0])[:80]!r}): the evaluation scores prompts the policy trains on",
                      stacklevel=2)  # fmt: skip
    return train, heldout


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
