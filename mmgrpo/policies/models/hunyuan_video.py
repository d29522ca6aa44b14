"""HunyuanVideo family (``HunyuanVideoTransformer3DModel``, guidance-distilled, flow matching; text-to-video).

Knows only what diffusers' ``HunyuanVideoPipeline`` does, step for step:

- condition: the prompt is written into a Llama-3 chat template, tokenized to ``crop_start + L`` tokens and
  encoded by the Llama text encoder; the hidden state two layers before the last is kept and its first
  ``crop_start`` positions (the system turn and the user header) are cropped, with the attention mask. A CLIP
  text model adds pooled embeddings. HunyuanVideo is guidance-distilled: the embedded guidance scale (x1000)
  is a per-row model input (``cond["guidance"]``), distinct from true classifier-free guidance (the policy's
  ``guidance_scale``, which runs a second forward on the empty prompt, like the pipeline's ``true_cfg_scale``).
- latents ``[C, (F-1)//4+1, H//8, W//8]``, unpacked and unscaled (the transformer patchifies them itself);
- schedule: sigmas ``linspace(1, 0, T+1)[:-1]`` through the scheduler's shift (7.0 for HunyuanVideo),
  model time ``sigma * 1000``;
- decoding: ``AutoencoderKLHunyuanVideo.decode(z / scaling_factor)`` to videos ``[n, F, 3, H, W]`` in [0, 1];
- frame rate (``fps``, what the written samples play at): :data:`FPS`.

Height, width, frame count and fps are checked against the checkpoint's vae/config.json before ``from_pretrained``
loads any weights, and again by ``__init__`` for adapters built from components.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
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
from mmgrpo.policies.sources import ModelSource, component_config, load_denoiser, pipeline_folder, pipeline_source

FPS = 24.0
"""frames per second HunyuanVideo generates at: Tencent's reference inference (sample_video.py of
Tencent/HunyuanVideo) writes its samples with ``save_videos_grid(..., fps=24)``, the rate of its 129-frame (about
5 s) clips. diffusers' HunyuanVideoPipeline example exports at ``fps=15``, which plays the same frames 1.6x slower."""


def default_prompt_template() -> dict[str, Any]:
    """HunyuanVideoPipeline's chat template; its crop_start = 95 Llama-3 tokens: BOS, the system turn, user header."""
    with needs("diffusion", "the hunyuan_video model family"):
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


def template_prefix_length(tokenizer: Any, template: str) -> int:
    """Tokens before the prompt in ``template`` (with BOS): the number of positions the pipeline crops."""
    if template.count("{}") != 1:
        raise UserError(f"prompt template must contain exactly one '{{}}' where the prompt goes, got {template!r}")
    return len(tokenizer(template.split("{}")[0]).input_ids)


def check_size(height: int, width: int, num_frames: int, temporal: int) -> None:
    """The sizes HunyuanVideo takes (the VAE's 8x spatial compression x the transformer's 2x2 patches, the VAE's
    ``temporal`` compression), at most :data:`~mmgrpo.policies.models.MAX_VIDEO_SIDE` px and
    :data:`~mmgrpo.policies.models.MAX_VIDEO_FRAMES` frames (its rotary embedding has no limit of its own:
    height=100000 computed for minutes into an out-of-memory error); shared by ``__init__`` and
    :meth:`HunyuanVideoAdapter.check_pretrained`, which checks the config files before the weights load."""
    for key, value, largest, unit in [("height", height, MAX_VIDEO_SIDE, "px"), ("width", width, MAX_VIDEO_SIDE, "px"),
                                      ("num_frames", num_frames, MAX_VIDEO_FRAMES, "frames")]:  # fmt: skip
        why = f"mmgrpo takes for any video model ({largest} {unit}, beyond which it only runs out of memory)"
        refuse_above("HunyuanVideo", key, value, largest, why)
    if height % 16 or width % 16:
        raise UserError(f"height={height}, width={width}: HunyuanVideo needs both divisible by 16 (e.g. 480 x 848)")
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise UserError(f"num_frames={num_frames}: HunyuanVideo needs {temporal}k+1 frames (e.g. 33, 61, 129)")


class HunyuanVideoAdapter:
    family = "hunyuan_video"
    parameterization = "flow"
    prediction_type = "flow"
    # attention projections of the dual-stream blocks (image and text streams) and of the single-stream blocks
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    no_xformers = ("diffusers' xformers processor for its attention layers drops HunyuanVideo's rotary embedding and "
                   "q/k norms and returns one stream where its dual-stream blocks expect two")  # fmt: skip
    """why ``attention: xformers`` is refused for this family (its blocks use diffusers' legacy Attention class)"""
    # the pipeline sub-folders from_pretrained reads (what a hub download fetches)
    components = ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    source: ModelSource | None = None  # where from_pretrained read the pipeline (export copies its other parts)

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        text_encoder: nn.Module,
        tokenizer: Any,
        text_encoder_2: nn.Module,
        tokenizer_2: Any,
        vae: nn.Module,
        height: int = 720,
        width: int = 1280,
        num_frames: int = 129,
        fps: float = FPS,
        embedded_guidance_scale: float = 6.0,
        max_sequence_length: int = 256,
        prompt_template: dict[str, Any] | None = None,
        num_hidden_layers_to_skip: int = 2,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ):
        """``fps``: frames per second the written samples play at (:data:`FPS`); it changes no sample, only how a
        video file is timed."""
        self.denoiser, self.scheduler, self.vae = transformer, scheduler, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.device, self.dtype = torch.device(device), _dtype(dtype)
        self.embedded_guidance_scale = float(embedded_guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.num_hidden_layers_to_skip = num_hidden_layers_to_skip
        self.prompt_template = dict(prompt_template or default_prompt_template())
        self.crop_start = self._crop_start()
        self.spatial = int(vae.spatial_compression_ratio)
        self.temporal = int(vae.temporal_compression_ratio)
        self.height, self.width, self.num_frames = height, width, num_frames
        self._check_size()
        self.fps = check_fps("HunyuanVideo", fps)
        if scheduler.config.use_dynamic_shifting:
            raise UserError("the HunyuanVideo scheduler must use a fixed shift (use_dynamic_shifting=false), "
                            "as HunyuanVideoPipeline passes no mu")  # fmt: skip
        for m in [transformer, vae, text_encoder, text_encoder_2]:
            place(m, self.device, self.dtype)
        for m in [vae, text_encoder, text_encoder_2]:
            m.requires_grad_(False).eval()
        self._negative: Cond | None = None

    def _crop_start(self) -> int:
        """The template's crop_start (the pipeline's rule), else the measured prefix length; warn if they differ."""
        measured = template_prefix_length(self.tokenizer, self.prompt_template["template"])
        given = self.prompt_template.get("crop_start")
        if given is None:
            return measured
        if int(given) != measured:
            warnings.warn(
                f"prompt template crop_start={given} but the tokenizer puts {measured} tokens before the prompt; "
                "using crop_start as diffusers does (set prompt_template['crop_start']=None to use the measured one)",
                stacklevel=3,
            )
        return int(given)

    def _check_size(self) -> None:
        check_size(self.height, self.width, self.num_frames, self.temporal)

    @classmethod
    def check_pretrained(cls, src: ModelSource, options: dict[str, Any]) -> None:
        """:func:`check_size` and :func:`~mmgrpo.policies.models.check_fps` of the ``options`` from_pretrained was
        given (``__init__``'s defaults for the others) against the checkpoint's vae/config.json, before any weights
        load or download: ``__init__``'s refusal, minutes earlier. A checkpoint whose VAE config is missing or of
        another class is left to the loader, which names what is wrong; a model_index.json of another pipeline class
        is refused here, naming the family that loads it."""
        with needs("diffusion", "the hunyuan_video model family"):
            from diffusers import AutoencoderKLHunyuanVideo

        check_pipeline_class(src, "hunyuan_video", ("HunyuanVideoPipeline",), "hunyuanvideo-community/HunyuanVideo")
        vae = component_config(src, "vae", AutoencoderKLHunyuanVideo)
        if vae is None:
            return
        params = inspect.signature(cls.__init__).parameters
        o = {k: options.get(k, params[k].default) for k in ("height", "width", "num_frames", "fps")}
        check_size(o["height"], o["width"], o["num_frames"], vae["temporal_compression_ratio"])
        check_fps("HunyuanVideo", o["fps"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | ModelSource, device: str = "cpu", dtype: str = "float32", **kwargs: Any
    ) -> HunyuanVideoAdapter:
        """Load a diffusers-layout pipeline: transformer/, scheduler/, text_encoder(_2)/, tokenizer(_2)/, vae/;
        ``path`` a local folder, a hub id or a :class:`~mmgrpo.policies.sources.ModelSource` (revision, variant,
        single-file transformer)."""
        with needs("diffusion", "the hunyuan_video model family"):
            from diffusers import (
                AutoencoderKLHunyuanVideo,
                FlowMatchEulerDiscreteScheduler,
                HunyuanVideoTransformer3DModel,
            )
            from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        src = pipeline_source(path, cls.components, "transformer")
        cls.check_pretrained(src, kwargs)  # before the weights load (a hub id: before they download)
        src = pipeline_folder(src, cls.components, "transformer")
        refuse_pickle_weights(src.path, src.key, "diffusers.DiffusionPipeline")
        _check_parts(src.path)
        td = _dtype(dtype)
        transformer = load_denoiser(src, HunyuanVideoTransformer3DModel, "transformer", td)
        with src.errors():
            parts = (
                FlowMatchEulerDiscreteScheduler.from_pretrained(src.path, subfolder="scheduler"),
                LlamaModel.from_pretrained(src.path, torch_dtype=td, **src.encoder_weights("text_encoder")),
                AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer"),
                CLIPTextModel.from_pretrained(src.path, torch_dtype=td, **src.encoder_weights("text_encoder_2")),
                AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer_2"),
                AutoencoderKLHunyuanVideo.from_pretrained(src.path, torch_dtype=td, **src.weights("vae")),
            )
        adapter = cls(transformer, *parts, device=device, dtype=dtype, **kwargs)
        adapter.source = src
        return adapter

    # ------------------------------------------------------------------ condition
    def _llama(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama hidden states [B, L, D] and mask [B, L] of the templated prompts, system turn cropped."""
        crop = self.crop_start
        templated = [self.prompt_template["template"].format(t) for t in texts]
        length, name = self.max_sequence_length + crop, "Llama text encoder (with its template)"
        tok = tokenize(self.tokenizer, templated, length, name, return_attention_mask=True)
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-(self.num_hidden_layers_to_skip + 1)]
        if crop > 0:
            hidden, mask = hidden[:, crop:], mask[:, crop:]
        return hidden, mask

    def _clip_pooled(self, texts: list[str]) -> torch.Tensor:
        """CLIP pooled embeddings [B, P] (77 tokens, as the pipeline)."""
        ids = tokenize(self.tokenizer_2, texts, 77, "CLIP text encoder").input_ids.to(self.device)
        return self.text_encoder_2(ids, output_hidden_states=False).pooler_output

    @torch.no_grad()
    def encode(self, prompts: list[Any], meta: list[dict] | None = None) -> Cond:
        texts = [str(p) for p in prompts]
        hidden, mask = self._llama(texts)
        B = len(texts)
        # the distilled guidance embedding input: scale * 1000 in the model dtype, one per row (the pipeline's rule)
        guidance = torch.full((B,), self.embedded_guidance_scale, dtype=self.dtype, device=self.device) * 1000.0
        return {
            "prompt_embeds": hidden.to(self.dtype),  # [B, L, D]
            "prompt_attention_mask": mask.to(self.dtype),  # [B, L]
            "pooled": self._clip_pooled(texts).to(self.dtype),  # [B, P]
            "guidance": guidance,  # [B]
        }

    def encode_negative(self, n: int) -> Cond:
        if self._negative is None:
            self._negative = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ model
    def latent_shape(self) -> tuple[int, ...]:
        c = self.denoiser.config.in_channels
        f = (self.num_frames - 1) // self.temporal + 1
        return (c, f, self.height // self.spatial, self.width // self.spatial)

    def schedule(self, num_steps: int) -> Schedule:
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]  # the pipeline's sigmas, shifted by the scheduler
        self.scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas)
        return Schedule(timesteps=self.scheduler.timesteps.float().cpu(), sigmas=self.scheduler.sigmas.float().cpu())

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.scheduler.config.num_train_timesteps

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return module(
            hidden_states=latents.to(self.dtype),  # [n, C, f, h, w]
            timestep=t.to(self.device, torch.float32),  # the pipeline's timesteps are fp32 (its latents' dtype)
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            pooled_projections=cond["pooled"],
            guidance=cond["guidance"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, C, f, h, w] -> videos [n, F, 3, H, W] in [0, 1]; one row at a time (video VAEs are large)."""
        scale = self.vae.config.scaling_factor
        videos = []
        for z in latents.to(self.vae.dtype):
            video = self.vae.decode(z[None] / scale, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
            videos.append(video.float().permute(0, 2, 1, 3, 4))
        return (torch.cat(videos) / 2 + 0.5).clamp(0, 1)


def _check_parts(path: str) -> None:
    """Every sub-folder the pipeline needs (its model_index.json class: check_pretrained, before the weights)."""
    p = Path(path)
    for needed in ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"):
        if not (p / needed).is_dir():
            raise UserError(f"model path '{path}' has no {needed}/ folder; is it a HunyuanVideo diffusers checkpoint?")


ADAPTERS.add(
    "hunyuan_video", HunyuanVideoAdapter, "HunyuanVideo T2V (dual/single-stream DiT, guidance-distilled; Llama + CLIP)"
)
