"""FLUX.1 family (``FluxTransformer2DModel``, rectified flow; Black Forest Labs 2024): dev, schnell and fine-tunes.

Knows only what diffusers' ``FluxPipeline`` does around its transformer, replicated exactly:

- prompt: the CLIP-L *pooled* output (``pooler_output``, padded to the CLIP tokenizer's length) and the T5
  last hidden state (padded to ``max_sequence_length``); ``txt_ids`` are zeros ``[L, 3]``;
- latents: the VAE latent ``[C, h, w]`` is cut into 2x2 patches and packed into ``h/2 * w/2`` tokens of
  ``4C`` channels before every forward (unpacked after it); ``img_ids [h/2 * w/2, 3]`` hold (0, row, col);
- time: sigmas ``linspace(1, 1/T, T)`` shifted with ``mu = calculate_shift(image_seq_len)`` (resolution
  dependent, "dynamic shifting" for dev; a fixed shift, 1 for schnell, when the scheduler says so); the
  transformer gets ``timestep / 1000``;
- guidance: FLUX.1-dev is guidance *distilled*: the wanted CFG strength is an *input* (``guidance``, an
  adapter option, 3.5 by default), carried per row in the condition; schnell has no guidance embedding.
  True classifier-free guidance (``FluxPipeline``'s ``true_cfg_scale`` with an empty negative prompt) is the
  policy's ``guidance_scale``; leave it at 1 for dev, as the GRPO papers do;
- decoding: ``latents / scaling_factor + shift_factor`` through the ``AutoencoderKL``.

Latents are kept *unpacked* ``[N, C, h, w]`` everywhere outside :meth:`FluxAdapter.predict`: the SDE step is
elementwise, so packing is a pure permutation of the same numbers, and the policy's seeded noise of shape
``[C, h, w]`` is then exactly the noise ``FluxPipeline`` draws from the same generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.safe_weights import refuse_pickle_weights
from mmgrpo.policies.diffusion import ADAPTERS, Cond, Schedule
from mmgrpo.policies.models import decode_in_parts, place
from mmgrpo.policies.models import resolve_dtype as _dtype
from mmgrpo.policies.models.text import tokenize
from mmgrpo.policies.sources import ModelSource, load_denoiser, pipeline_folder

_REQUIRED = ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")


# ---------------------------------------------------------------------------------------------- pure helpers


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """2x2 patchify, as ``FluxPipeline._pack_latents``: ``[n, C, h, w] -> [n, h/2 * w/2, 4C]``.

    Token ``(i, j)`` (row-major) holds channels ``c`` of pixels ``(2i + a, 2j + b)`` at index ``4c + 2a + b``.
    """
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [n, h/2, w/2, C, 2, 2]
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents``): ``[n, h/2 * w/2, 4C] -> [n, C, h, w]``."""
    n, _, c4 = x.shape
    x = x.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [n, C, h/2, 2, w/2, 2]
    return x.reshape(n, c4 // 4, h, w)


def latent_image_ids(h2: int, w2: int) -> torch.Tensor:
    """Rotary position ids of the packed image tokens: ``[h2 * w2, 3]`` rows ``(0, row, col)``, row-major."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


def calculate_shift(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the packed image sequence length.

    ``mu`` goes from ``base_shift`` at ``base_seq_len`` tokens (256 = 512px) to ``max_shift`` at ``max_seq_len``
    (4096 = 1024px); sigmas are then shifted as ``e^mu / (e^mu + 1/sigma - 1)`` (larger images: noisier steps).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# ---------------------------------------------------------------------------------------------- adapter


class FluxAdapter:
    """FLUX.1 as a :class:`~mmgrpo.policies.diffusion.DiffusionAdapter` (latents ``[C, h, w]``, unpacked).

    ``guidance`` is the distilled-guidance input of dev-style checkpoints (ignored when the transformer has no
    guidance embedding, i.e. schnell); ``max_sequence_length`` the T5 length (default: the T5 tokenizer's
    length, at most 512 as in ``FluxPipeline``).
    """

    family = "flux"
    parameterization = "flow"
    prediction_type = "flow"
    # the double-stream blocks' image and text attention projections; "to_q/k/v" also match the single blocks
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    components = _REQUIRED  # the pipeline sub-folders from_pretrained reads (what a hub download fetches)
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
        height: int | None = None,
        width: int | None = None,
        guidance: float = 3.5,
        max_sequence_length: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ):
        parts = dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                     tokenizer_2=tokenizer_2, vae=vae)  # fmt: skip
        missing = [k for k, v in parts.items() if v is None]
        if missing:
            raise UserError(f"the FLUX family needs CLIP, T5 and a VAE; missing: {', '.join(missing)}")
        self.denoiser, self.scheduler, self.vae = transformer, scheduler, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.device, self.dtype = torch.device(device), _dtype(dtype)
        self.guidance = float(guidance)
        self.max_sequence_length = max_sequence_length or min(512, int(tokenizer_2.model_max_length))
        if not 1 <= self.max_sequence_length <= 512:
            raise UserError(f"max_sequence_length={self.max_sequence_length}: FLUX's T5 takes 1..512 tokens")
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the FLUX VAE
        # FluxPipeline's default size: 128 latent pixels (1024 px for the 8x VAE)
        self.height, self.width = height or 128 * self.scale, width or 128 * self.scale
        for name, size in (("height", self.height), ("width", self.width)):
            if size % (2 * self.scale):  # 2x2 packing of latents that are `scale` times smaller
                lo = size // (2 * self.scale) * 2 * self.scale
                raise UserError(f"policy.options.{name}={size} must be a multiple of {2 * self.scale} for FLUX "
                                f"(VAE x{self.scale}, 2x2 packing); use {lo} or {lo + 2 * self.scale}")  # fmt: skip
        for m in (transformer, vae, text_encoder, text_encoder_2):
            place(m, self.device, self.dtype)
        for m in (vae, text_encoder, text_encoder_2):
            m.requires_grad_(False).eval()
        _, h, w = self.latent_shape()
        self._img_ids = latent_image_ids(h // 2, w // 2).to(self.device, self.dtype)  # [h/2 * w/2, 3]
        self._negative: Cond | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | ModelSource, device: str = "cpu", dtype: str = "float32", **kwargs: Any
    ) -> FluxAdapter:
        """Load a ``FluxPipeline``: transformer/, scheduler/, text_encoder(_2)/, tokenizer(_2)/, vae/; ``path`` a
        local folder, a hub id or a :class:`~mmgrpo.policies.sources.ModelSource` (revision, variant, single-file
        transformer).

        ``kwargs``: ``height``, ``width``, ``guidance``, ``max_sequence_length`` (see the class).
        """
        with needs("diffusion", "the flux model family"):
            from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        src = pipeline_folder(path, cls.components, "transformer")
        refuse_pickle_weights(src.path, src.key, "diffusers.DiffusionPipeline")
        _check_layout(src.path)
        td = _dtype(dtype)
        transformer = load_denoiser(src, FluxTransformer2DModel, "transformer", td)
        with src.errors():
            parts = dict(
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src.path, subfolder="scheduler"),
                text_encoder=CLIPTextModel.from_pretrained(
                    src.path, torch_dtype=td, **src.encoder_weights("text_encoder")
                ),
                tokenizer=AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer"),
                text_encoder_2=T5EncoderModel.from_pretrained(
                    src.path, torch_dtype=td, **src.encoder_weights("text_encoder_2")
                ),
                tokenizer_2=AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer_2"),
                vae=AutoencoderKL.from_pretrained(src.path, torch_dtype=td, **src.weights("vae")),
            )
        adapter = cls(transformer=transformer, **parts, device=device, dtype=dtype, **kwargs)
        adapter.source = src
        return adapter

    # ------------------------------------------------------------------ condition
    @torch.no_grad()
    def encode(self, prompts: list[Any], meta: list[dict] | None = None) -> Cond:
        """``prompt_embeds [B, L, D]`` (T5), ``pooled [B, P]`` (CLIP), ``guidance [B]`` fp32 (dev only)."""
        texts = [str(p) for p in prompts]
        tok = self.tokenizer
        ids = tokenize(tok, texts, tok.model_max_length, "CLIP text encoder").input_ids
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output  # [B, P]
        ids2 = tokenize(self.tokenizer_2, texts, self.max_sequence_length, "T5 encoder").input_ids
        embeds = self.text_encoder_2(ids2.to(self.device), output_hidden_states=False)[0]  # [B, L, D]
        cond = {"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}
        if self.denoiser.config.guidance_embeds:
            # FluxPipeline passes the distilled guidance in fp32; the transformer casts it
            cond["guidance"] = torch.full((len(texts),), self.guidance, dtype=torch.float32, device=self.device)
        return cond

    def encode_negative(self, n: int) -> Cond:
        """The empty prompt [n, ...] (true CFG's negative; it keeps the distilled guidance input)."""
        if self._negative is None:
            self._negative = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ model
    def latent_shape(self) -> tuple[int, ...]:
        c = self.denoiser.config.in_channels // 4  # the transformer sees 2x2-packed channels
        return (c, self.height // self.scale, self.width // self.scale)

    def schedule(self, num_steps: int) -> Schedule:
        """FluxPipeline's schedule: ``linspace(1, 1/T, T)`` shifted with ``mu`` of the packed sequence length."""
        cfg = self.scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        _, h, w = self.latent_shape()
        mu = calculate_shift(
            (h // 2) * (w // 2),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if sigmas is None:
            self.scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return Schedule(timesteps=self.scheduler.timesteps.float().cpu(), sigmas=self.scheduler.sigmas.float().cpu())

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.scheduler.config.num_train_timesteps

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``[n, C, h, w]`` for latents ``[n, C, h, w]`` at scheduler times ``t [n]`` (0..1000)."""
        _, _, h, w = latents.shape
        embeds = cond["prompt_embeds"]
        out = module(
            hidden_states=pack_latents(latents.to(self.dtype)),  # [n, h/2 * w/2, 4C]
            timestep=t.to(self.device, self.dtype) / 1000,  # as FluxPipeline: the transformer multiplies back
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),  # [L, 3]
            img_ids=self._img_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[n, C, h, w]`` -> images ``[n, 3, H, W]`` in [0, 1], in parts (VAE memory: decode_in_parts)."""
        cfg = self.vae.config

        def decode(z: torch.Tensor) -> torch.Tensor:
            z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            return (self.vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

        return decode_in_parts(decode, latents.to(self.dtype))


def _check_layout(path: str) -> None:
    """A FluxPipeline folder with every component."""
    p = Path(path)
    names = {d.name for d in p.iterdir() if d.is_dir()}
    index = p / "model_index.json"
    if index.is_file():
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name and "Flux" not in cls_name:
            raise UserError(f"model path '{path}' holds a {cls_name}, not a FLUX pipeline; set policy.options.family")
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise UserError(f"model path '{path}' has no {', '.join(m + '/' for m in missing)} folder(s); "
                        "is it a FLUX.1 (FluxPipeline) checkpoint?")  # fmt: skip


ADAPTERS.add("flux", FluxAdapter, "FLUX.1 dev/schnell (MMDiT, rectified flow; CLIP pooled + T5, 2x2 packed latents)")
