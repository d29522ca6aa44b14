"""Recipe: text-to-video GRPO on a video flow family (Wan 2.x, HunyuanVideo; DanceGRPO, Flow-GRPO, MixGRPO, G2RPO).

    mmgrpo train configs/wan_t2v_mix.yaml          # point policy.options.path at real weights

The text-to-image recipe with video samples ``[N, F, 3, H, W]``: prompts from a text file (one per line) or the
built-in shapes world; rewards take videos (``video_frames`` around any image reward, ``temporal_consistency``,
``motion``); sample grids are saved as mp4 (frames side by side). Evaluation samples held-out prompts with the ODE
sampler at fixed seeds, as in ``mmgrpo/pipelines/text_to_image.py``, whose pieces this recipe reuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmgrpo.core.errors import UserError
from mmgrpo.pipelines.text_to_image import (
    PromptDataOptions,
    generator_components,
    generator_options,
    read_prompt_splits,
)
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.train.components import PIPELINES, Components, Pipeline
from mmgrpo.train.config import Config


@dataclass
class VideoPolicyOptions(GeneratorPolicyOptions):
    family: str = "wan"
    """video model family: wan (Wan 2.1 / 2.2), hunyuan_video"""


@dataclass
class VideoPromptDataOptions(PromptDataOptions):
    eval_batch_size: int = 4
    """videos per evaluation forward batch"""
    grid_images: int = 8
    """evaluation videos shown side by side in each saved mp4"""


def load_video_adapter(opts: GeneratorPolicyOptions, device, image_conditioned: bool = False):
    """load_adapter, then check that the family makes videos (latents [C, F', h, w]) with the wanted conditioning."""
    adapter = load_adapter(opts, device)
    if len(adapter.latent_shape()) != 4:
        raise UserError(f"policy.options.family={opts.family!r} makes images; use pipeline text_to_image")
    if bool(getattr(adapter, "image_conditioned", False)) != image_conditioned:
        want, other = ("an image-to-video", "text_to_video") if image_conditioned else ("a text-to-video",
                                                                                         "image_to_video")  # fmt: skip
        raise UserError(f"policy.options.path {opts.path!r} is not {want} checkpoint; use pipeline {other}")
    return adapter


def build_text_to_video(cfg: Config, accelerator=None) -> Components:
    popts, data, device = generator_options(cfg, accelerator, VideoPolicyOptions, VideoPromptDataOptions)
    splits = read_prompt_splits(data)  # the data first: a bad file is named before the weights load (minutes)
    policy = DiffusionPolicy(load_video_adapter(popts, device), popts)
    return generator_components(cfg, data, policy, *splits)


PIPELINES.add(
    "text_to_video",
    Pipeline(
        build=build_text_to_video,
        policy_options=VideoPolicyOptions,
        data_options=VideoPromptDataOptions,
        description="text-to-video GRPO on Wan 2.x / HunyuanVideo (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO)",
    ),
)
