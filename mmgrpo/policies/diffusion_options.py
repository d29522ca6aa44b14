"""The options of :class:`~mmgrpo.policies.diffusion.DiffusionPolicy` (``policy.options`` of the image and video
recipes) and their checks, which run when the config loads (``Pipeline.check -> options_from``), before any model
loads: the sampling grid, classifier-free guidance, LoRA, the attention kernel, and every strategy's own options (the
SDE, the exploration schedule, the objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmgrpo.core.errors import bad_option
from mmgrpo.core.extras import installed, missing_extra
from mmgrpo.core.schema import from_dict
from mmgrpo.policies import sde
from mmgrpo.policies.exploration import EXPLORATION
from mmgrpo.policies.objectives import OBJECTIVES, objective_class
from mmgrpo.policies.strategy import resolve_options

MAX_STEPS = 1000
"""the most sampling steps a rollout takes (``policy.options.num_steps``): the schedulers' training timesteps"""
MAX_GUIDANCE = 100.0
"""the largest classifier-free guidance scale (``policy.options.guidance_scale``, ``mmgrpo sample --guidance``)"""


@dataclass
class DiffusionPolicyOptions:
    __renamed__ = {  # the flat options of 0.1 -> their place in the nested blocks
        "noise_level": "sde.noise_level", "timestep_fraction": "exploration.timestep_fraction",
        "selection": "exploration.selection", "window_size": "exploration.size", "window_mode": "exploration.mode",
        "shift_every": "exploration.shift_every", "branch_steps": "exploration.branch_steps",
        "granularities": "exploration.granularities", "nft_beta": "objective.beta",
        "old_policy_ema": "objective.old_policy_ema", "rollout_guidance_scale": "objective.rollout_guidance_scale",
        "fm_timesteps": "objective.timesteps", "fm_sigma_range": "objective.sigma_range",
        "fm_shared_draws": "objective.shared_draws", "fm_weighting": "objective.weighting",
    }  # fmt: skip

    num_steps: int = 10
    """T: sampling steps"""
    guidance_scale: float = 1.0
    """classifier-free guidance (1 = off)"""
    guidance_uncond_grad: bool = True
    """with guidance_scale > 1, the sde objective's training forward back-propagates through both branches of the
    guided output uncond + s (cond - uncond), as Flow-GRPO and DDPO do (their train.cfg). false detaches the
    unconditional branch: its forward keeps no activations (about half the update's memory and backward) but the
    gradient then lacks the (1 - s) d(uncond) term, so it is not their gradient and the unconditional model is not
    trained"""
    sde: sde.SDEOptions = field(default_factory=sde.SDEOptions)
    """the sampler's dynamics {kind, noise_level}: flow_grpo (Flow-GRPO), dance (DanceGRPO), cps for flow families,
    ddim for UNet families; noise_level 0 = the ODE"""
    exploration: Any = "full"
    """which steps are SDE/trained, {name, ...options}: full (DanceGRPO/Flow-GRPO: timestep_fraction, selection),
    window (MixGRPO: size, mode, shift_every), singular (G2RPO: branch_steps, granularities); a bare name = its
    defaults. Resolved to that schedule's options dataclass (``mmgrpo.policies.exploration``)"""
    objective: Any = "sde"
    """what the loss trains, {name, ...options}. sde: the sampler's stochastic steps (log-probs of the SDE
    transitions; DanceGRPO, Flow-GRPO, MixGRPO, G2RPO). flow_matching: advantage-weighted flow matching on the final
    samples (AWM; flow families; timesteps, sigma_range, shared_draws, weighting, old_policy_ema,
    rollout_guidance_scale). nft: DiffusionNFT on the same draws (pair with loss.name=nft; beta, timesteps,
    sigma_range, shared_draws, old_policy_ema). Resolved to that objective's options dataclass
    (``mmgrpo.policies.objectives``, ``mmgrpo.policies.flow_matching``)"""
    shared_init_noise: bool = False
    """all G samples of a prompt start from the same noise (DanceGRPO); singular always shares"""
    reference_kl: bool = False
    """compute the KL to the reference for loss.beta > 0: the LoRA adapter disabled, or with full fine-tuning
    (lora_rank 0) a frozen copy of the initial denoiser (one more copy of its weights in memory)"""
    lora_rank: int = 0
    """LoRA rank on the denoiser's attention projections (0 = full fine-tuning)"""
    lora_alpha: float | None = None
    """LoRA alpha (default = rank)"""
    lora_targets: list[str] = field(default_factory=list)
    """LoRA target modules (default: the family's attention projections)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass"""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """attention kernel (xformers needs the gpu extra)"""

    def __post_init__(self) -> None:
        # runs when the recipe checks the config (Pipeline.check -> options_from): every strategy's options and
        # checks run there, before any model loads
        if isinstance(self.sde, dict):
            self.sde = from_dict(sde.SDEOptions, self.sde, "the config", prefix="policy.options.sde")
        self.exploration = resolve_options(EXPLORATION, self.exploration, "policy.options.exploration")
        self.objective = resolve_options(OBJECTIVES, self.objective, "policy.options.objective")
        if not 1 <= self.num_steps <= MAX_STEPS:  # 10**9 allocated its schedule until the machine killed the run
            raise bad_option("policy.options.num_steps", self.num_steps, f"must be 1 to {MAX_STEPS}: the schedulers "
                             f"are defined on {MAX_STEPS} training timesteps (DDIM steps on them; Flow-GRPO and "
                             "DanceGRPO sample 10-50)")  # fmt: skip
        if not (math.isfinite(self.guidance_scale) and 1 <= self.guidance_scale <= MAX_GUIDANCE):
            raise bad_option("policy.options.guidance_scale", self.guidance_scale, "classifier-free guidance must be "
                             f"a number from 1 to {MAX_GUIDANCE:g}, e.g. 4.5; 1 = off (where diffusers reads 0 as "
                             "off, here 0 would sample the unconditional model and below 1 weaken the prompt; "
                             "published scales are 3.5-12, and 1e38 made every sample NaN)")  # fmt: skip
        if self.lora_rank < 0:
            raise bad_option("policy.options.lora_rank", self.lora_rank,
                             "must be >= 0; set it to 0 (full fine-tuning) or a LoRA rank, e.g. 32")  # fmt: skip
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad_option("policy.options.lora_alpha", self.lora_alpha, "the LoRA scale numerator must be a "
                             "finite number > 0 (scale = alpha / rank), or null for the rank itself")  # fmt: skip
        if not self.guidance_uncond_grad and not self.guidance_trained():
            raise bad_option("policy.options.guidance_uncond_grad", False, "it does nothing here: only the sde "
                             "objective trains through classifier-free guidance, and only with guidance_scale > 1 "
                             f"(here objective {self.objective.name}, guidance_scale {self.guidance_scale}); remove "
                             "it")  # fmt: skip
        objective_class(self).check_options(self)
        check_steps = getattr(self.exploration, "check_steps", None)  # a plug-in schedule's options may have none
        if check_steps is not None:
            check_steps(self.num_steps)

    def training_warnings(self) -> list[str]:
        """What a training run of these options is warned about as it starts (:func:`build_components`): the
        exploration schedule's advice against ``num_steps`` (a MixGRPO window that covers every step)."""
        advise = getattr(self.exploration, "training_warnings", None)  # a plug-in schedule's options may have none
        return list(advise(self.num_steps)) if advise is not None else []

    def guidance_trained(self) -> bool:
        """Whether the loss back-propagates through a guided output: an objective that trains the guided output (sde;
        flow_matching and nft train the unguided velocity) with guidance_scale > 1."""
        return objective_class(self).trains_guided and self.guidance_scale != 1.0


def check_attention(attention: str, device: torch.device | str) -> None:
    """``policy.options.attention=xformers`` where it cannot run, as one paragraph instead of diffusers' traceback
    (``ModuleNotFoundError: Refer to https://github.com/facebookresearch/xformers ...``, once the weights are loaded):
    xformers' kernels need a CUDA device, and the ``gpu`` extra's package. The recipes check it with the device
    they load the model on, before any weights load (:func:`mmgrpo.policies.loading.load_adapter`)."""
    if attention != "xformers":
        return
    kind = torch.device(device).type
    if kind != "cuda":
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the model runs on {kind}"
        raise bad_option("policy.options.attention", "xformers", f"xformers' attention kernels run on a CUDA GPU "
                         f'only (with the gpu extra: pip install "mmgrpo[gpu]"), and {where}; set '
                         "policy.options.attention=sdpa, PyTorch's scaled-dot-product attention, which runs on "
                         "every device")  # fmt: skip
    if not installed("xformers"):
        raise missing_extra("gpu", "policy.options.attention=xformers", "xformers")
