"""Stable Diffusion 3 / 3.5 family (MMDiT ``SD3Transformer2DModel``, flow matching).

Knows only: encode a prompt (CLIP-L + CLIP-G penultimate hidden states and pooled projections, plus T5,
exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt``), call the transformer, the shifted
flow-matching sigma schedule, and VAE decoding. A checkpoint may omit parts: without ``text_encoder_3``
the T5 block is ``max_sequence_length`` zero tokens (as diffusers does); without a ``vae`` the model works in pixel
space ([-1, 1]).

A model trained with one CLIP encoder and no T5 block (the shipped shapes model) carries *placeholders*: a
``text_encoder_2`` CLIP model and a ``text_encoder_3`` T5 encoder whose weights are all zero, so their outputs are
exactly zero. They exist because diffusers' ``encode_prompt`` always calls two CLIP encoders and its
``from_pretrained`` requires a T5 one; the second CLIP's hidden states are cropped away (the CLIP block is padded or
cropped to the transformer's width, as diffusers does) and its pooled zeros meet zero columns of the pooled
projection; the placeholder T5 gives the zero tokens diffusers uses without T5 (the adapter makes them without running
it). Such a model has no T5 block, so ``max_sequence_length`` defaults to 0 for it (diffusers:
``pipe(prompt, max_sequence_length=0)`` on a pipeline loaded with ``text_encoder_3=None, tokenizer_3=None``);
otherwise to 256, diffusers' default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.safe_weights import refuse_pickle_weights
from mmgrpo.policies.diffusion import ADAPTERS, Cond, Schedule
from mmgrpo.policies.models import decode_in_parts, place
from mmgrpo.policies.models import resolve_dtype as _dtype
from mmgrpo.policies.models.text import tokenize
from mmgrpo.policies.sources import ModelSource, component_config, load_denoiser, pipeline_folder, pipeline_source


def check_size(height: int, width: int, scale: int, patch: int, max_patches: int | None, default: int) -> None:
    """The image sizes an SD3 transformer takes: multiples of the VAE's downsampling ``scale`` times its ``patch``
    size, and at most ``max_patches`` patches a side (``pos_embed_max_size``: its position embedding is cropped from a
    table of that size; SD3-medium 192 patches of 16 px, 3072 px). Shared by ``__init__`` and
    :meth:`SD3Adapter.check_pretrained` (before the weights load); diffusers' own errors came at the first forward."""
    step = scale * patch
    if height % step or width % step or height < step or width < step:
        raise UserError(f"SD3 height x width {height}x{width} must be positive multiples of {step} (the VAE's "
                        f"{scale}x downsampling x the transformer's {patch}x{patch} patches); set "
                        f"policy.options.height/width, e.g. {default}x{default} (the checkpoint's own "
                        "size)")  # fmt: skip
    if max_patches and max(height, width) > max_patches * step:
        raise UserError(f"SD3 height x width {height}x{width}: this checkpoint's transformer places at most "
                        f"{max_patches} patches of {step} px a side (pos_embed_max_size), {max_patches * step} px; "
                        f"set policy.options.height/width to at most that, e.g. {default}x{default} (its own "
                        "size)")  # fmt: skip


class SD3Adapter:
    family = "sd3"
    parameterization = "flow"
    prediction_type = "flow"
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    # the pipeline sub-folders from_pretrained may read (what a hub download fetches)
    components = ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3", "vae")  # fmt: skip
    source: ModelSource | None = None  # where from_pretrained read the pipeline (export copies its other parts)

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        text_encoders: list[nn.Module | None],
        tokenizers: list[Any | None],
        vae: nn.Module | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ):
        self.denoiser = transformer
        self.scheduler = scheduler
        self.text_encoders = (list(text_encoders) + [None, None, None])[:3]
        self.tokenizers = (list(tokenizers) + [None, None, None])[:3]
        if self.text_encoders[0] is None or self.tokenizers[0] is None:
            raise UserError("the SD3 family needs at least text_encoder + tokenizer (a CLIP text model)")
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        #: which text encoders (CLIP, CLIP 2, T5) are placeholders (all-zero weights, see the module docstring)
        self.placeholder = [enc is not None and is_placeholder(enc) for enc in self.text_encoders]
        if self.placeholder[0]:
            raise UserError("the SD3 text_encoder has all-zero weights; only text_encoder_2/3 may be placeholders")
        if max_sequence_length is None:
            real_second = self.text_encoders[1] is not None and not self.placeholder[1]
            real_t5 = self.text_encoders[2] is not None and not self.placeholder[2]
            max_sequence_length = 256 if real_t5 or real_second else 0
        if not 0 <= max_sequence_length <= 512:
            raise UserError(f"max_sequence_length={max_sequence_length}: SD3 takes 0..512 T5 tokens")
        self.max_sequence_length = max_sequence_length
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        tc = transformer.config
        default = tc.sample_size * scale
        self.height, self.width = height or default, width or default
        check_size(self.height, self.width, scale, tc.patch_size, tc.get("pos_embed_max_size"), default)
        self.scale = scale
        for m in [transformer, vae, *self.text_encoders]:
            if m is not None:
                place(m, self.device, self.dtype)
        for m in [vae, *self.text_encoders]:
            if m is not None:
                m.requires_grad_(False).eval()
        self._negative: Cond | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_pretrained(cls, src: ModelSource, options: dict[str, Any]) -> None:
        """:func:`check_size` of the ``height`` / ``width`` from_pretrained was given against the checkpoint's
        transformer/ and vae/ config.json, before any weights load or download (diffusers' own error came from the
        first forward, after them). Config files that are missing or of other classes are left to the loader."""
        with needs("diffusion", "the sd3 model family"):
            from diffusers import AutoencoderKL, SD3Transformer2DModel

        transformer = component_config(src, "transformer", SD3Transformer2DModel)
        if transformer is None:
            return
        vae = (
            component_config(src, "vae", AutoencoderKL) if (Path(src.path) / "vae").is_dir() or not src.local else None
        )
        scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae is not None else 1
        default = transformer["sample_size"] * scale
        height, width = options.get("height") or default, options.get("width") or default
        check_size(height, width, scale, transformer["patch_size"], transformer.get("pos_embed_max_size"), default)

    @classmethod
    def from_pretrained(
        cls, path: str | ModelSource, device: str = "cpu", dtype: str = "float32", **kwargs: Any
    ) -> SD3Adapter:
        """Load a diffusers-layout pipeline: transformer/, scheduler/, text_encoder*/, tokenizer*/, vae/ (optional);
        ``path`` a local folder, a hub id or a :class:`~mmgrpo.policies.sources.ModelSource` (revision, variant,
        single-file transformer)."""
        with needs("diffusion", "the sd3 model family"):
            from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
            from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        src = pipeline_source(path, cls.components, "transformer")
        cls.check_pretrained(src, kwargs)  # before the weights load (a hub id: before they download)
        src = pipeline_folder(src, cls.components, "transformer")
        refuse_pickle_weights(src.path, src.key, "diffusers.DiffusionPipeline")
        parts = _parts(src.path)
        td = _dtype(dtype)
        transformer = load_denoiser(src, SD3Transformer2DModel, "transformer", td)
        with src.errors():
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src.path, subfolder="scheduler")
            encoders, tokenizers = [], []
            spec = [(CLIPTextModelWithProjection, ""), (CLIPTextModelWithProjection, "_2"), (T5EncoderModel, "_3")]
            for enc_cls, sub in spec:
                if f"text_encoder{sub}" in parts:
                    encoders.append(
                        enc_cls.from_pretrained(src.path, torch_dtype=td, **src.encoder_weights(f"text_encoder{sub}"))
                    )
                    tokenizers.append(AutoTokenizer.from_pretrained(src.path, subfolder=f"tokenizer{sub}"))
                else:
                    encoders.append(None)
                    tokenizers.append(None)
            vae = (
                AutoencoderKL.from_pretrained(src.path, torch_dtype=td, **src.weights("vae"))
                if "vae" in parts
                else None
            )
        adapter = cls(transformer, scheduler, encoders, tokenizers, vae, device=device, dtype=dtype, **kwargs)
        adapter.source = src
        return adapter

    # ------------------------------------------------------------------ condition
    @torch.no_grad()
    def encode(self, prompts: list[Any], meta: list[dict] | None = None) -> Cond:
        texts = [str(p) for p in prompts]
        clip_hidden, pooled = [], []
        for enc, tok in zip(self.text_encoders[:2], self.tokenizers[:2]):
            if enc is None:
                continue
            ids = tokenize(tok, texts, tok.model_max_length, "CLIP text encoder").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0])
            clip_hidden.append(out.hidden_states[-2])
        joint = self.denoiser.config.joint_attention_dim
        width = sum(h.shape[-1] for h, fake in zip(clip_hidden, self.placeholder) if not fake)
        if width > joint:
            raise UserError(f"the CLIP text features have width {width} but the transformer expects at most {joint}")
        enc3, tok3 = self.text_encoders[2], self.tokenizers[2]
        if enc3 is not None and not self.placeholder[2]:
            ids = tokenize(tok3, texts, self.max_sequence_length, "T5 encoder",
                           add_special_tokens=True).input_ids.to(self.device)  # fmt: skip
            t5 = enc3(ids)[0]
        else:  # SD3 without T5 (or its all-zero placeholder): zero tokens, none for a model trained without them
            t5 = torch.zeros(
                len(texts), self.max_sequence_length, joint, device=self.device, dtype=clip_hidden[0].dtype
            )
        if t5.shape[-1] != joint:
            raise UserError(f"the T5 features have width {t5.shape[-1]} but the transformer expects {joint}")
        clip = torch.nn.functional.pad(
            torch.cat(clip_hidden, dim=-1), (0, joint - sum(h.shape[-1] for h in clip_hidden))
        )
        embeds = torch.cat([clip, t5], dim=-2)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled": torch.cat(pooled, dim=-1).to(self.dtype)}

    def encode_negative(self, n: int) -> Cond:
        if self._negative is None:
            self._negative = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ model
    def latent_shape(self) -> tuple[int, ...]:
        c = self.denoiser.config.in_channels
        return (c, self.height // self.scale, self.width // self.scale)

    def schedule(self, num_steps: int) -> Schedule:
        self.scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = self.scheduler.sigmas.float().cpu()
        return Schedule(timesteps=self.scheduler.timesteps.float().cpu(), sigmas=sigmas)

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.scheduler.config.num_train_timesteps

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return module(
            hidden_states=latents.to(self.dtype),
            timestep=t.to(self.device),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents, self.dtype)


def decode_latents(vae: nn.Module | None, latents: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from SD3 latents: un-normalised by the VAE's scaling / shift factors and
    decoded in parts (VAE memory: decode_in_parts); without a VAE the latents are pixels in [-1, 1]."""
    if vae is None:
        return (latents.float() / 2 + 0.5).clamp(0, 1)
    cfg = vae.config

    def decode(z: torch.Tensor) -> torch.Tensor:
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    return decode_in_parts(decode, latents.to(dtype or vae.dtype))


def is_placeholder(encoder: nn.Module) -> bool:
    """True when every weight of ``encoder`` is zero (a placeholder text encoder: its outputs are exactly zero).
    Stops at the first non-zero tensor, so a real encoder costs one small check."""
    return all(p.count_nonzero() == 0 for p in encoder.parameters())


def _parts(path: str) -> set[str]:
    """Sub-folders present in a local checkpoint folder (and named in its model_index.json)."""
    p = Path(path)
    index = p / "model_index.json"
    names = {d.name for d in p.iterdir() if d.is_dir()}
    if index.is_file():
        listed = {k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None}
        names &= listed | {"transformer", "scheduler"}
    for needed in ("transformer", "scheduler", "text_encoder", "tokenizer"):
        if needed not in names:
            raise UserError(f"model path '{path}' has no {needed}/ folder; is it an SD3-layout checkpoint?")
    return names


ADAPTERS.add("sd3", SD3Adapter, "Stable Diffusion 3 / 3.5 (MMDiT, flow matching; CLIP-L/G + T5)")
