"""Wan 2.x video family (``WanTransformer3DModel``, flow matching; UMT5 text encoder; ``AutoencoderKLWan``).

Knows only what diffusers' ``WanPipeline`` (text-to-video) and ``WanImageToVideoPipeline`` (image-to-video)
do, replicated step for step:

- text: UMT5 last hidden states of the cleaned prompt, zeroed after the prompt's own tokens (``[B, L, D]``);
- latents ``[C, F', h, w]`` with ``F' = (F - 1) / 4 + 1`` and ``h, w = H / 8, W / 8`` (the VAE's temporal /
  spatial compression), normalised per channel by the VAE's ``latents_mean`` / ``latents_std``;
- image-to-video (transformer ``in_channels = 2 C + 4``): the first frame, followed by F - 1 black frames, is
  VAE-encoded (mode), normalised and concatenated with a first-frame mask ``[4, F', h, w]`` as condition channels
  (``cond["condition"] [B, 4 + C, F', h, w]``); Wan 2.1 I2V also cross-attends to the CLIP-ViT penultimate hidden
  states of the frame (``cond["image_embeds"] [B, 257, 1280]``); CFG keeps both and swaps only the text;
- Wan 2.2: A14B's two experts (``transformer`` above the boundary timestep, ``transformer_2`` below) are one
  trainable denoiser (:class:`WanExperts`); TI2V-5B's per-token timesteps (``expand_timesteps``) for text-to-video;
- schedule: Wan checkpoints ship a UniPC scheduler; the SDE policy needs flow-matching Euler sigmas, so the
  checkpoint's ``flow_shift`` (or ``shift``) builds a ``FlowMatchEulerDiscreteScheduler`` with the same shift,
  ``sigma' = s sigma / (1 + (s - 1) sigma)``, stepping on the shipped scheduler's grid: UniPC's N sigmas are
  ``linspace(1, 1/1000, N + 1)[:-1]`` shifted, then 0 (Euler's own default, ``linspace(1, shifted 1/1000, N)``
  shifted again, then 0, makes its last step from ~0.009 to 0: N steps of which N - 1 denoise, and Wan 2.2's
  high-noise expert one step fewer than in ``WanPipeline``); a checkpoint that ships flow Euler keeps Euler's grid;
- decoding: ``z * std + mean`` -> VAE -> videos ``[n, F, 3, H, W]`` in [0, 1];
- frame rate (``fps``, what the written samples play at): :data:`FPS`, Wan 2.2 TI2V-5B :data:`TI2V_FPS`.

Height, width, frame count and fps are checked against the checkpoint's config files (transformer patch size, VAE
compression) before ``from_pretrained`` loads any weights, and again by ``__init__`` for adapters built from
components.

The first frame of a row comes from ``meta["image"]`` (a path or PIL image) or ``meta["video"]`` (an mp4 path: its
FIRST frame, read with PyAV, the ``video`` extra); a prompt object with a ``meta`` dict (a ``str`` subclass, see
``mmgrpo/pipelines/image_to_video.py``) may carry them instead.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.files import open_video
from mmgrpo.core.safe_weights import refuse_pickle_weights
from mmgrpo.policies.diffusion import ADAPTERS, Cond, Schedule
from mmgrpo.policies.models import (
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_SIDE,
    check_fps,
    check_pipeline_class,
    place,
    refuse_above,
)
from mmgrpo.policies.models import resolve_dtype as _dtype
from mmgrpo.policies.models.text import tokenize
from mmgrpo.policies.sources import (
    ModelSource,
    component_config,
    load_denoiser,
    pipeline_folder,
    pipeline_source,
    sibling,
)
from mmgrpo.policies.vlm_inputs import load_image

IMAGE_KEYS = ("condition", "image_embeds")  # per-row image conditioning, shared by both CFG branches
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
FPS = 16.0
"""frames per second Wan 2.1 / 2.2 generate at: the Wan team's ``sample_fps`` (wan/configs/shared_config.py of
Wan-Video/Wan2.1 and Wan2.2), and the rate diffusers' Wan examples export at (``export_to_video(..., fps=16)``)"""
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
"""the diffusers pipelines (model_index.json ``_class_name``) whose transformer is a ``WanTransformer3DModel``"""
ASPECT_TOLERANCE = 1.05
"""a first frame whose width / height is within this factor of the video's is not reported as stretched: a 16:9
frame into Wan's 832 x 480 (1.733, the multiple of 16 nearest 16:9) is 2.5% off"""
MAX_ENLARGE = 2.0
"""a first frame enlarged more than this factor on a side to the video's height or width is reported (a 1 x 1 frame
becomes a flat colour)"""
TI2V_FPS = 24.0
"""Wan 2.2 TI2V-5B's rate (``sample_fps = 24`` in Wan2.2's wan/configs/wan_ti2v_5B.py): the checkpoint whose
model_index.json sets ``expand_timesteps``"""


def flow_scheduler(scheduler: Any) -> Any:
    """The checkpoint's scheduler as flow-matching Euler with the same shift.

    Wan's diffusers checkpoints ship ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``; the SDE
    policy steps on Euler sigmas, so we read ``flow_shift`` (UniPC) or ``shift`` (flow Euler) from its config.
    Which grid of sigmas it steps on: :func:`unipc_grid`.
    """
    with needs("diffusion", "the wan model family"):
        from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = dict(getattr(scheduler, "config", scheduler))
    if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_config(cfg)
    shift = cfg.get("flow_shift", cfg.get("shift"))
    if shift is None:
        raise UserError(f"the Wan scheduler config has neither 'flow_shift' nor 'shift' (keys: {sorted(cfg)})")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=shift)


def unipc_grid(scheduler: Any, num_steps: int) -> np.ndarray | None:
    """The N unshifted sigmas UniPC's flow sigmas step on, ``linspace(1, 1 / num_train_timesteps, N + 1)[:-1]``
    (``UniPCMultistepScheduler.set_timesteps`` with ``use_flow_sigmas``; the shift and the final 0 are added by
    the Euler scheduler's ``set_timesteps(sigmas=...)``, as by UniPC's), when the checkpoint's scheduler
    (``scheduler``: the scheduler or its config) is UniPC's (it has ``flow_shift``, which flow Euler's has not);
    None (Euler's own grid) when it is flow Euler's."""
    cfg = dict(getattr(scheduler, "config", scheduler))
    if "flow_shift" not in cfg or cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return None
    return unipc_flow_sigmas(num_steps, cfg.get("num_train_timesteps", 1000))


def unipc_flow_sigmas(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """``linspace(1, 1 / num_train_timesteps, N + 1)[:-1]``: UniPC's N flow sigmas before the shift."""
    return np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]


def check_size(
    height: int, width: int, num_frames: int, spatial: int, temporal: int, patch: tuple, rope_max_seq_len: int = 1024
) -> None:
    """The sizes Wan's VAE (``spatial`` / ``temporal`` compression) and transformer (``patch``, ``rope_max_seq_len``)
    take; shared by ``__init__`` and :meth:`WanAdapter.check_pretrained`, which checks the config files before the
    weights load.

    The transformer's rotary embedding (diffusers' ``WanRotaryPosEmbed``) holds ``rope_max_seq_len`` positions per
    axis: the patched latent frames ``F' // p_t`` (``F' = (F - 1) / temporal + 1``), height ``H / spatial // p_h`` and
    width may each be at most that (1024 in the released checkpoints: 4093 frames, 16384 px); beyond it the forward
    failed with "shape '[25001, 1, 1, -1]' is invalid". Above that, :data:`~mmgrpo.policies.models.MAX_VIDEO_SIDE`
    and :data:`~mmgrpo.policies.models.MAX_VIDEO_FRAMES` bound every video family."""
    rope = rope_max_seq_len
    rope_frames = ((rope + 1) * patch[0] - 2) * temporal + 1  # the largest temporal k + 1 with F' // p_t <= rope
    for key, value, by_rope, sane, unit in [
        ("height", height, rope * patch[1] * spatial, MAX_VIDEO_SIDE, "px"),
        ("width", width, rope * patch[2] * spatial, MAX_VIDEO_SIDE, "px"),
        ("num_frames", num_frames, rope_frames, MAX_VIDEO_FRAMES, "frames"),
    ]:
        if by_rope < sane:
            axis = {"height": f"patch {patch[1]} x VAE {spatial}", "width": f"patch {patch[2]} x VAE {spatial}",
                    "num_frames": f"patch {patch[0]}, VAE temporal compression {temporal}"}[key]  # fmt: skip
            why = (f"this checkpoint takes: its transformer's rotary embedding holds rope_max_seq_len={rope} "
                   f"positions per axis ({axis}), {by_rope} {unit}")  # fmt: skip
        else:
            why = f"mmgrpo takes for any video model ({sane} {unit}, beyond which it only runs out of memory)"
        refuse_above("Wan", key, value, min(by_rope, sane), why)
    mh, mw = spatial * patch[1], spatial * patch[2]
    if height % mh or width % mw or height % 16 or width % 16:
        raise UserError(f"Wan height x width {height}x{width} must be multiples of 16 and of {mh}x{mw} (VAE x "
                        "patch); set policy.options.height/width, e.g. 480x832")  # fmt: skip
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise UserError(f"Wan num_frames={num_frames}: num_frames - 1 must be a multiple of the VAE's temporal "
                        f"compression {temporal} (e.g. 81, 49, 33)")  # fmt: skip


def first_frame(source: Any, is_video: bool = False) -> Any:
    """A PIL RGB image from an image path, a PIL image, an [H, W, 3] uint8 array, or a video path (FIRST frame)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"first frame: expected a path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"first-frame source '{path}' does not exist")
    if not (is_video or path.suffix.lower() in VIDEO_SUFFIXES):
        return load_image(path)  # upright by its EXIF orientation; 16-bit and transparent images as they look
    return Image.fromarray(open_video(path, "first frame").frames([0])[0]).convert("RGB")


def frame_source(prompt: Any, meta: dict) -> tuple[Any, bool] | None:
    """(source, is_video) of a row's first frame: ``meta['image']`` or ``meta['video']``, else the prompt's meta."""
    for m in (meta or {}, getattr(prompt, "meta", None) or {}):
        if m.get("image") is not None:
            return m["image"], False
        if m.get("video") is not None:
            return m["video"], True
    return None


def first_frame_mask(num_frames: int, temporal: int, h: int, w: int) -> torch.Tensor:
    """WanImageToVideoPipeline's mask ``[1, temporal, F', h, w]``: 1 on the first frame, 0 on the F - 1 others.

    The first pixel frame is repeated ``temporal`` times so the F = 1 + temporal (F' - 1) frames fold into F'
    latent frames of ``temporal`` channels each.
    """
    mask = torch.ones(1, 1, num_frames, h, w)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)  # [1, 1, temporal * F', h, w]
    return mask.view(1, -1, temporal, h, w).transpose(1, 2)


class WanExperts(nn.Module):
    """Wan 2.2 A14B's two experts as one denoiser: ``high`` for timesteps >= ``boundary``, ``low`` below.

    Rows of one call may mix both (a log-prob batch mixes steps); each expert runs on its rows. Under DDP a
    minibatch whose steps all fall on one side leaves the other expert's parameters unused (accelerate needs
    ``find_unused_parameters``).
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary_timestep: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, float(boundary_timestep)

    @property
    def config(self) -> Any:
        return self.high.config

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False, **kw: Any):
        t = timestep if timestep.ndim == 1 else timestep.amax(1)  # [n] (per-token timesteps: the row's t)
        high = t >= self.boundary
        outs, order = [], []
        for expert, rows in ((self.high, high), (self.low, ~high)):
            idx = rows.nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            sub = {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            outs.append(expert(hidden_states=hidden_states[idx], timestep=timestep[idx], return_dict=False, **sub)[0])
            order.append(idx)
        out = torch.cat(outs)[torch.argsort(torch.cat(order))]  # back to the input row order
        return (out,)

    # the diffusers model API that DiffusionPolicy uses, applied to both experts
    def add_adapter(self, config: Any) -> None:
        self.high.add_adapter(config)
        self.low.add_adapter(config)

    def disable_adapters(self) -> None:
        self.high.disable_adapters()
        self.low.disable_adapters()

    def enable_adapters(self) -> None:
        self.high.enable_adapters()
        self.low.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        self.high.enable_xformers_memory_efficient_attention()
        self.low.enable_xformers_memory_efficient_attention()


class WanAdapter:
    family = "wan"
    parameterization = "flow"
    prediction_type = "flow"
    # self- and cross-attention (attn1, attn2) of every block; add_k/v_proj: Wan 2.1 I2V's image cross-attention
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    # the pipeline sub-folders from_pretrained may read (what a hub download fetches)
    components = ("transformer", "transformer_2", "scheduler", "text_encoder", "tokenizer", "vae", "image_encoder",
                  "image_processor")  # fmt: skip
    source: ModelSource | None = None  # where from_pretrained read the pipeline (export copies its other parts)

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        image_encoder: nn.Module | None = None,
        image_processor: Any = None,
        transformer_2: nn.Module | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        fps: float | None = None,
        max_sequence_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ):
        """``fps``: frames per second the written samples play at; None: the checkpoint's own rate (:data:`FPS`,
        :data:`TI2V_FPS` with ``expand_timesteps``). It changes no sample, only how a video file is timed."""
        with needs("diffusion", "the wan model family"):
            from diffusers.video_processor import VideoProcessor

        self.device, self.dtype = torch.device(device), _dtype(dtype)
        self.scheduler = flow_scheduler(scheduler)
        self._shipped = scheduler  # the checkpoint's own scheduler (or its config): which grid (unipc_grid)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.max_sequence_length, self.expand_timesteps = max_sequence_length, expand_timesteps
        self.temporal, self.spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
        self.z_dim = vae.config.z_dim
        self.patch = tuple(transformer.config.patch_size)
        self.rope_max_seq_len = int(transformer.config.rope_max_seq_len)
        self.height, self.width, self.num_frames = height, width, num_frames
        self._check_size()
        self.fps = check_fps("Wan", fps) if fps is not None else TI2V_FPS if expand_timesteps else FPS
        if transformer_2 is not None:
            if boundary_ratio is None:
                raise UserError("a Wan checkpoint with transformer_2 needs boundary_ratio in model_index.json")
            boundary = boundary_ratio * self.scheduler.config.num_train_timesteps
            self.denoiser: nn.Module = WanExperts(transformer, transformer_2, boundary)
        else:
            self.denoiser = transformer
        in_c = transformer.config.in_channels
        self.image_conditioned = in_c == 2 * self.z_dim + self.temporal  # Wan 2.1 / 2.2 A14B image-to-video
        if not self.image_conditioned and in_c != self.z_dim:
            i2v = 2 * self.z_dim + self.temporal
            raise UserError(f"Wan transformer in_channels={in_c}: expected {self.z_dim} (text-to-video) or {i2v} "
                            f"(image-to-video) for the VAE's z_dim={self.z_dim}")  # fmt: skip
        self.uses_clip = transformer.config.image_dim is not None
        if self.uses_clip and (image_encoder is None or image_processor is None):
            raise UserError("this Wan 2.1 image-to-video transformer needs image_encoder/ and image_processor/")
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial)
        # Wan's VAE and CLIP image encoder run in fp32, as diffusers' Wan examples load them
        for m, dt in [(transformer, self.dtype), (transformer_2, self.dtype), (text_encoder, self.dtype),
                      (vae, torch.float32), (image_encoder, torch.float32)]:  # fmt: skip
            if m is not None:
                place(m, self.device, dt)
        for m in [vae, text_encoder, image_encoder]:
            if m is not None:
                m.requires_grad_(False).eval()
        self._negative: Cond | None = None
        self._image_rows: Cond | None = None  # the last conditional call's image tensors (see _with_image)
        self._frame_warned = False  # a stretched or enlarged first frame was reported (_check_frame_shape)

    def _check_size(self) -> None:
        check_size(self.height, self.width, self.num_frames, self.spatial, self.temporal, self.patch,
                   self.rope_max_seq_len)  # fmt: skip

    @classmethod
    def check_pretrained(cls, src: ModelSource, options: dict[str, Any]) -> None:
        """:func:`check_size` and :func:`~mmgrpo.policies.models.check_fps` of the ``options`` from_pretrained was
        given (``__init__``'s defaults for the others) against the checkpoint's transformer/ and vae/ config.json,
        before any weights load or download: ``__init__``'s refusal, minutes earlier. A checkpoint whose config files
        are missing or of other classes is left to the loader, which names what is wrong; a model_index.json of
        another pipeline class than :data:`PIPELINES` is refused here, naming the family that loads it."""
        with needs("diffusion", "the wan model family"):
            from diffusers import AutoencoderKLWan, WanTransformer3DModel

        check_pipeline_class(src, "wan", PIPELINES, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        transformer = component_config(src, "transformer", WanTransformer3DModel)
        vae = component_config(src, "vae", AutoencoderKLWan)
        if transformer is None or vae is None:
            return
        params = inspect.signature(cls.__init__).parameters
        o = {k: options.get(k, params[k].default) for k in ("height", "width", "num_frames", "fps")}
        check_size(o["height"], o["width"], o["num_frames"], vae["scale_factor_spatial"], vae["scale_factor_temporal"],
                   tuple(transformer["patch_size"]), int(transformer["rope_max_seq_len"]))  # fmt: skip
        if o["fps"] is not None:
            check_fps("Wan", o["fps"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | ModelSource, device: str = "cpu", dtype: str = "float32", **kwargs: Any
    ) -> WanAdapter:
        """Load a diffusers-layout pipeline: transformer/ (+ transformer_2/), scheduler/, text_encoder/, tokenizer/,
        vae/, and for Wan 2.1 I2V image_encoder/ + image_processor/; pipeline options from model_index.json.
        ``path``: a local folder, a hub id or a :class:`~mmgrpo.policies.sources.ModelSource` (revision, variant,
        single-file transformer)."""
        with needs("diffusion", "the wan model family"):
            from diffusers import AutoencoderKLWan, WanTransformer3DModel
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

        src = pipeline_source(path, cls.components, "transformer")
        cls.check_pretrained(src, kwargs)  # before the weights load (a hub id: before they download)
        src = pipeline_folder(src, cls.components, "transformer")
        refuse_pickle_weights(src.path, src.key, "diffusers.DiffusionPipeline")
        parts, index = _parts(src.path)
        if src.denoiser_file and "transformer_2" in parts:
            raise UserError(f"{sibling(src.key, 'denoiser_file')}: {src.describe()} has two experts (transformer/, "
                            "transformer_2/; Wan 2.2 A14B), and a single file replaces one denoiser; make a "
                            "diffusers folder with both experts instead")  # fmt: skip
        td = _dtype(dtype)
        t1 = load_denoiser(src, WanTransformer3DModel, "transformer", td)
        with src.errors():
            t2 = None
            if "transformer_2" in parts:
                t2 = WanTransformer3DModel.from_pretrained(src.path, torch_dtype=td, **src.weights("transformer_2"))
            scheduler_cfg = json.loads((Path(src.path) / "scheduler" / "scheduler_config.json").read_text())
            image_encoder = image_processor = None
            if "image_encoder" in parts:
                image_encoder = CLIPVisionModel.from_pretrained(
                    src.path, torch_dtype=torch.float32, **src.encoder_weights("image_encoder")
                )
                image_processor = CLIPImageProcessor.from_pretrained(src.path, subfolder="image_processor")
            vae = AutoencoderKLWan.from_pretrained(src.path, torch_dtype=torch.float32, **src.weights("vae"))
            text_encoder = UMT5EncoderModel.from_pretrained(
                src.path, torch_dtype=td, **src.encoder_weights("text_encoder")
            )
            tokenizer = AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer")
        adapter = cls(
            t1, scheduler_cfg, vae, text_encoder, tokenizer, image_encoder, image_processor, t2,
            index.get("boundary_ratio"), bool(index.get("expand_timesteps")), device=device, dtype=dtype, **kwargs,
        )  # fmt: skip
        adapter.source = src
        return adapter

    # ------------------------------------------------------------------ condition
    @torch.no_grad()
    def _text(self, prompts: list[Any]) -> torch.Tensor:
        """WanPipeline._get_t5_prompt_embeds: [B, L, D], zeros after each prompt's own tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        texts = [prompt_clean(str(p)) for p in prompts]
        tok = tokenize(self.tokenizer, texts, self.max_sequence_length, "T5 encoder",
                       add_special_tokens=True, return_attention_mask=True)  # fmt: skip
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        keep = torch.arange(hidden.shape[1], device=self.device)[None, :] < mask.gt(0).sum(1)[:, None]  # [B, L]
        return torch.where(keep[..., None], hidden, torch.zeros_like(hidden)).to(self.dtype)

    @torch.no_grad()
    def _image_cond(self, frame: Any) -> Cond:
        """WanImageToVideoPipeline.prepare_latents (+ encode_image) for one first frame: tensors [1, ...]."""
        H, W, F = self.height, self.width, self.num_frames
        image = self.video_processor.preprocess(frame, height=H, width=W).to(self.device, torch.float32)
        video = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, F - 1, H, W)], dim=2)  # [1, 3, F, H, W]
        latent = self.vae.encode(video).latent_dist.mode().float()  # [1, C, F', h, w]
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, self.z_dim, 1, 1, 1).to(latent)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, self.z_dim, 1, 1, 1).to(latent)
        latent = (latent - mean) * inv_std
        mask = first_frame_mask(F, self.temporal, H // self.spatial, W // self.spatial).to(latent)
        out = {"condition": torch.cat([mask, latent], dim=1).to(self.dtype)}  # [1, temporal + C, F', h, w]
        if self.uses_clip:
            pixels = self.image_processor(images=frame, return_tensors="pt").to(self.device)
            hidden = self.image_encoder(**pixels, output_hidden_states=True).hidden_states[-2]
            out["image_embeds"] = hidden.to(self.dtype)  # [1, 257, 1280]
        return out

    def encode(self, prompts: list[Any], meta: list[dict] | None = None) -> Cond:
        cond = {"prompt_embeds": self._text(prompts)}
        if not self.image_conditioned:
            return cond
        rows = []
        for i, p in enumerate(prompts):  # one frame at a time: the VAE's result must not depend on the batch
            src = frame_source(p, (meta or [{}] * len(prompts))[i])
            if src is None:
                raise UserError(f"Wan image-to-video: prompt {str(p)!r} has no first frame; give meta['image'] "
                                "(a path or PIL image) or meta['video'] (an mp4 path)")  # fmt: skip
            image = first_frame(*src)
            self._check_frame_shape(image, src[0])
            rows.append(self._image_cond(image))
        cond.update({k: torch.cat([r[k] for r in rows]) for k in rows[0]})
        return cond

    def _check_frame_shape(self, frame: Any, source: Any) -> None:
        """Warn (once per adapter: once per run) when a first frame is stretched to the video's height x width (its
        aspect ratio off by more than :data:`ASPECT_TOLERANCE`) or enlarged more than :data:`MAX_ENLARGE` on a side:
        the pipeline's preprocessing resizes it to height x width whatever its shape, so a 2:1 photo became a
        distorted first frame, a 1 x 1 frame a flat colour, with no word. Neither is refused (the model still runs)."""
        if self._frame_warned:
            return
        w, h = frame.size
        W, H = self.width, self.height
        what, fix = [], []
        if abs(math.log((w / h) / (W / H))) > math.log(ASPECT_TOLERANCE):
            what.append(f"stretched from its aspect ratio {w / h:.3g} to the video's {W / H:.3g}")
            fix.append(f"crop or pad the frames to the video's aspect ratio ({W}:{H}), or set "
                       "policy.options.width/height to their shape (multiples of 16)")  # fmt: skip
        if max(W / w, H / h) > MAX_ENLARGE:
            what.append(f"enlarged {max(W / w, H / h):.3g}x")
            fix.append(f"give first frames of about {W}x{H} pixels or more")
        if not what:
            return
        self._frame_warned = True
        name = f"'{source}'" if isinstance(source, (str, os.PathLike)) else "(an in-memory image)"
        warnings.warn(f"Wan image-to-video: the first frame {name} of {w}x{h} pixels (width x height) is resized to "
                      f"the video's {W}x{H} and {' and '.join(what)}; {'; '.join(fix)}. Only the first such frame "
                      "of the run is reported", stacklevel=3)  # fmt: skip

    def encode_negative(self, n: int) -> Cond:
        """The empty negative prompt [n, L, D]; the image condition comes from the row (see predict)."""
        if self._negative is None:
            self._negative = {"prompt_embeds": self._text([""])}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ model
    def latent_shape(self) -> tuple[int, ...]:
        F = (self.num_frames - 1) // self.temporal + 1
        return (self.z_dim, F, self.height // self.spatial, self.width // self.spatial)

    def schedule(self, num_steps: int) -> Schedule:
        self.scheduler.set_timesteps(num_steps, device="cpu", sigmas=unipc_grid(self._shipped, num_steps))
        return Schedule(timesteps=self.scheduler.timesteps.float().cpu(), sigmas=self.scheduler.sigmas.float().cpu())

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.scheduler.config.num_train_timesteps

    def _with_image(self, cond: Cond, n: int) -> Cond:
        """The row's image condition for the unconditional (negative) branch.

        The pipeline's CFG branches share the first-frame latents and CLIP embedding and differ only in text, but
        ``encode_negative(n)`` knows no rows. DiffusionPolicy.guided always calls the conditional branch first,
        with the same rows, so the negative call reuses that call's image tensors.
        """
        if not self.image_conditioned:
            return cond
        if "condition" in cond:
            self._image_rows = {k: cond[k] for k in IMAGE_KEYS if k in cond}
            return cond
        if self._image_rows is None or self._image_rows["condition"].shape[0] != n:
            raise RuntimeError("Wan image-to-video: a negative-prompt forward without the conditional one before it")
        return {**self._image_rows, **cond}

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        n = latents.shape[0]
        cond = self._with_image(cond, n)
        x = latents.to(self.dtype)  # [n, C, F', h, w]
        if self.image_conditioned:
            x = torch.cat([x, cond["condition"]], dim=1)  # [n, 2C + temporal, F', h, w]
        timestep = t.to(self.device)
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per token (mask all ones for text-to-video)
            _, F, h, w = self.latent_shape()
            tokens = F * -(-h // self.patch[1]) * -(-w // self.patch[2])
            timestep = timestep[:, None].expand(n, tokens)
        kw = {"encoder_hidden_states_image": cond["image_embeds"]} if "image_embeds" in cond else {}
        return module(
            hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"], return_dict=False, **kw
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[n, C, F', h, w] -> videos [n, F, 3, H, W] in [0, 1], one row at a time (memory, layout independence)."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, self.z_dim, 1, 1, 1).to(self.device, torch.float32)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, self.z_dim, 1, 1, 1).to(self.device, torch.float32)
        out = []
        for z in latents.to(self.device, torch.float32).split(1):
            video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
            out.append((video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
        return torch.cat(out)


def _parts(path: str) -> tuple[set[str], dict]:
    """Sub-folders present in a checkpoint folder (and listed in its model_index.json), and that index."""
    p = Path(path)
    index = json.loads((p / "model_index.json").read_text()) if (p / "model_index.json").is_file() else {}
    names = {d.name for d in p.iterdir() if d.is_dir()}
    if index:
        listed = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        names &= listed
    for needed in ("transformer", "scheduler", "text_encoder", "tokenizer", "vae"):
        if needed not in names:
            raise UserError(f"model path '{path}' has no {needed}/ folder; is it a Wan diffusers-layout checkpoint?")
    return names, index


ADAPTERS.add("wan", WanAdapter, "Wan 2.1 / 2.2 video (text- and image-to-video; UMT5, Wan VAE, flow matching)")
