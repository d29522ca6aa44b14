"""Stable Diffusion 1.x / 2.x and SDXL family (``UNet2DConditionModel``, epsilon or v-prediction, DDIM).

Sampled as in DDPO (Black et al. 2023): DDIM with eta, every step a Gaussian policy step (``sde.ddim_step``).
Knows only: encode a prompt, call the UNet, the DDIM alpha-bar schedule, and VAE decoding, each exactly as
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with a ``DDIMScheduler`` do it:

- SD 1.x/2.x: the CLIP text model's last hidden state ``[B, L, D]``; the negative is the empty prompt.
- SDXL (detected by a ``text_encoder_2`` in the checkpoint): penultimate hidden states of both CLIP encoders
  concatenated ``[B, L, D1 + D2]``, pooled text embeddings from ``text_encoder_2`` ``[B, P]`` and the six
  ``add_time_ids`` (original size, crop top-left, target size) ``[B, 6]``, passed in ``added_cond_kwargs``; the
  negative is all zeros when the checkpoint sets ``force_zeros_for_empty_prompt`` (the SDXL default).

Schedule: ``alpha_bars[i]`` is the alpha-bar of ``timesteps[i]``; the step from ``timesteps[i]`` goes to the
alpha-bar ``alpha_bars[i + 1]``, which must also be the alpha-bar of the prev timestep that
``DDIMScheduler.step`` uses (``t - num_train_timesteps // T``, or ``final_alpha_cumprod`` below 0, i.e.
``set_alpha_to_one``). With ``timestep_spacing`` ``leading`` (SD's) this always holds; where it does not
(``linspace``, or ``trailing`` with T not dividing the train timesteps) the schedule is refused.
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
from mmgrpo.policies.sources import ModelSource, load_denoiser, pipeline_folder


class SDAdapter:
    family = "sd"
    parameterization = "ddim"
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # DDPO's LoRA on the UNet attention projections
    # the pipeline sub-folders from_pretrained may read (what a hub download fetches)
    components = ("unet", "scheduler", "text_encoder", "tokenizer", "vae", "text_encoder_2", "tokenizer_2")
    source: ModelSource | None = None  # where from_pretrained read the pipeline (export copies its other parts)

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        text_encoder: nn.Module,
        tokenizer: Any,
        vae: nn.Module,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
        height: int | None = None,
        width: int | None = None,
        force_zeros_for_empty_prompt: bool = True,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ):
        with needs("diffusion", "the sd model family"):
            from diffusers import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            raise UserError(f"the sd family samples with a DDIMScheduler, got {type(scheduler).__name__}; "
                            "build one with DDIMScheduler.from_config(scheduler.config)")  # fmt: skip
        _check_scheduler(scheduler.config)
        self.denoiser, self.scheduler, self.vae = unet, scheduler, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.xl = text_encoder_2 is not None
        if self.xl and tokenizer_2 is None:
            raise UserError("the SDXL checkpoint has text_encoder_2/ but no tokenizer_2/; add the tokenizer folder")
        if unet.config.time_cond_proj_dim is not None:
            raise UserError("the UNet has time_cond_proj_dim set (a guidance-distilled LCM UNet); the sd family "
                            "supports plain SD/SDXL UNets only")  # fmt: skip
        self.prediction_type = scheduler.config.prediction_type
        self.force_zeros = force_zeros_for_empty_prompt
        self.device, self.dtype = torch.device(device), _dtype(dtype)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)
        default = unet.config.sample_size * self.scale
        self.height, self.width = height or default, width or default
        for name, size in (("height", self.height), ("width", self.width)):
            if size % self.scale:
                raise UserError(f"policy.options.{name}={size} is not a multiple of the VAE factor {self.scale}")
        for m in [unet, vae, text_encoder, text_encoder_2]:
            if m is not None:
                place(m, self.device, self.dtype)
        if self.dtype == torch.float16 and vae.config.force_upcast:  # the fp16 SD/SDXL VAE overflows (diffusers)
            vae.to(torch.float32)
        for m in [vae, text_encoder, text_encoder_2]:
            if m is not None:
                m.requires_grad_(False).eval()
        if self.xl:
            self._check_add_embedding()
        self._negative: Cond | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | ModelSource, device: str = "cpu", dtype: str = "float32", **kwargs: Any
    ) -> SDAdapter:
        """Load a diffusers-layout pipeline: unet/, scheduler/, text_encoder/, tokenizer/, vae/ (+ *_2 for SDXL);
        ``path`` a local folder, a hub id or a :class:`~mmgrpo.policies.sources.ModelSource` (revision, variant,
        single-file UNet).

        The scheduler config (PNDM for SD 1.5, Euler for SDXL, ...) is read into a ``DDIMScheduler``, as DDPO does.
        """
        with needs("diffusion", "the sd model family"):
            from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
            from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        src = pipeline_folder(path, cls.components, "unet")
        refuse_pickle_weights(src.path, src.key, "diffusers.DiffusionPipeline")
        parts, index = _parts(src.path)
        td = _dtype(dtype)
        unet = load_denoiser(src, UNet2DConditionModel, "unet", td)
        with src.errors():
            scheduler = DDIMScheduler.from_pretrained(src.path, subfolder="scheduler")
            te = CLIPTextModel.from_pretrained(src.path, torch_dtype=td, **src.encoder_weights("text_encoder"))
            tok = AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer")
            vae = AutoencoderKL.from_pretrained(src.path, torch_dtype=td, **src.weights("vae"))
            te2 = tok2 = None
            if "text_encoder_2" in parts:  # SDXL
                te2 = CLIPTextModelWithProjection.from_pretrained(
                    src.path, torch_dtype=td, **src.encoder_weights("text_encoder_2")
                )
                tok2 = AutoTokenizer.from_pretrained(src.path, subfolder="tokenizer_2")
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        adapter = cls(unet, scheduler, te, tok, vae, te2, tok2, force_zeros_for_empty_prompt=zeros, device=device,
                      dtype=dtype, **kwargs)  # fmt: skip
        adapter.source = src
        return adapter

    def _check_add_embedding(self) -> None:
        cfg = self.denoiser.config
        if cfg.addition_embed_type != "text_time":
            raise UserError(f"the checkpoint has text_encoder_2/ (SDXL) but its UNet has addition_embed_type="
                            f"{cfg.addition_embed_type!r}, not 'text_time'; is it an SDXL checkpoint?")  # fmt: skip
        passed = cfg.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise UserError(f"the SDXL UNet expects an added embedding of {expected} but 6 time ids x "
                            f"{cfg.addition_time_embed_dim} + pooled {self.text_encoder_2.config.projection_dim} "
                            f"give {passed}; text_encoder_2 does not match the UNet")  # fmt: skip

    # ------------------------------------------------------------------ condition
    def _tokens(self, tok: Any, texts: list[str]) -> Any:
        return tokenize(tok, texts, tok.model_max_length, "CLIP text encoder")

    @torch.no_grad()
    def encode(self, prompts: list[Any], meta: list[dict] | None = None) -> Cond:
        """``prompt_embeds [B, L, D]``; SDXL adds ``text_embeds [B, P]`` and ``time_ids [B, 6]``."""
        texts = [str(p) for p in prompts]
        if not self.xl:  # StableDiffusionPipeline.encode_prompt (clip_skip None)
            tokens = self._tokens(self.tokenizer, texts)
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = tokens.attention_mask.to(self.device)
            out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
            return {"prompt_embeds": out[0].to(self.dtype)}  # last hidden state
        hidden, pooled = [], None  # StableDiffusionXLPipeline.encode_prompt (clip_skip None)
        for enc, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            out = enc(self._tokens(tok, texts).input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # only CLIPTextModelWithProjection gives 2-d text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to(self.dtype)
        return {"prompt_embeds": embeds, "text_embeds": pooled.to(self.dtype), "time_ids": self._time_ids(len(texts))}

    def _time_ids(self, n: int) -> torch.Tensor:
        """SDXL micro-conditioning [n, 6]: original size, crop top-left (0, 0), target size (all the image size)."""
        h, w = self.height, self.width
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).expand(n, 6)

    def encode_negative(self, n: int) -> Cond:
        if self._negative is None:
            if self.xl and self.force_zeros:  # SDXL's force_zeros_for_empty_prompt
                pos = self.encode([""])
                self._negative = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in pos.items()}
            else:
                self._negative = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ model
    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, self.height // self.scale, self.width // self.scale)

    def schedule(self, num_steps: int) -> Schedule:
        """DDIM timesteps [T] (int64) and alpha_bars [T+1] (fp32), following ``DDIMScheduler.step``."""
        return ddim_schedule(self.scheduler, num_steps)

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        raise UserError(
            "the sd family is a DDIM UNet on discrete timesteps, it has no flow sigma; "
            "G2RPO granularities > 1 need a flow family (set policy.options.granularities=[1])"
        )

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Noise (or v) prediction of the UNet ``module`` at integer timesteps ``t [n]``: [n, C, h, w]."""
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if self.xl else None
        return module(
            sample=latents.to(self.dtype),
            timestep=t.to(self.device),
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, C, h, w] -> images [n, 3, H, W] in [0, 1] (SDXL: latents_mean/std when the VAE has them), in
        parts (VAE memory: decode_in_parts)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if self.xl and mean is not None and std is not None:
            c = z.shape[1]
            mean = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, c, 1, 1)
            std = torch.tensor(std, dtype=z.dtype, device=z.device).view(1, c, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        return decode_in_parts(lambda p: (self.vae.decode(p, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1), z)


def ddim_schedule(scheduler: Any, num_steps: int) -> Schedule:
    """``Schedule(timesteps [T], alpha_bars [T+1])`` of a diffusers ``DDIMScheduler`` for T = num_steps.

    ``DDIMScheduler.step`` goes from ``t`` to ``prev = t - num_train_timesteps // T`` (alpha-bar
    ``alphas_cumprod[prev]``, or ``final_alpha_cumprod`` when prev < 0). The policy's schedule has one alpha-bar
    per state, so step i's target alpha-bar must be the alpha-bar of ``timesteps[i + 1]``; a spacing for which
    that fails is refused rather than silently sampled differently from diffusers.
    """
    cfg = scheduler.config
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise UserError(f"policy.options.num_steps={num_steps} must be in [1, {cfg.num_train_timesteps}]")
    scheduler.set_timesteps(num_steps, device="cpu")
    ts = scheduler.timesteps.long().cpu()  # [T]
    ac = scheduler.alphas_cumprod.float().cpu()  # [num_train_timesteps]
    prev = ts - cfg.num_train_timesteps // num_steps  # [T]: DDIMScheduler.step's prev-timestep rule
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).cpu()
    a_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], final)  # [T]
    a = ac[ts]  # [T]
    if not torch.equal(a_prev[:-1], a[1:]):
        bad = int((a_prev[:-1] != a[1:]).nonzero()[0, 0])
        raise UserError(
            f"DDIM with timestep_spacing={cfg.timestep_spacing!r} and num_steps={num_steps} steps from timestep "
            f"{int(ts[bad])} to {int(prev[bad])}, but the next sampled timestep is {int(ts[bad + 1])}: the sd "
            "policy needs them equal; use timestep_spacing 'leading' (SD's default) in the scheduler config, or "
            f"'trailing' with a num_steps that divides {cfg.num_train_timesteps}"
        )
    return Schedule(timesteps=ts, alpha_bars=torch.cat([a, a_prev[-1:]]))


def _check_scheduler(cfg: Any) -> None:
    """Refuse scheduler settings that ``sde.ddim_step`` (through DiffusionPolicy) does not reproduce."""
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"scheduler prediction_type={cfg.prediction_type!r}: the sd family supports epsilon "
                        "and v_prediction UNets")  # fmt: skip
    if cfg.thresholding or cfg.clip_sample:
        raise UserError("the scheduler config sets clip_sample or thresholding, which the DDIM policy step does "
                        "not apply (SD checkpoints use clip_sample: false); set clip_sample: false and "
                        "thresholding: false in scheduler/scheduler_config.json")  # fmt: skip


def _parts(path: str) -> tuple[set[str], dict]:
    """Sub-folders present in an SD/SDXL checkpoint folder (those listed in model_index.json) and the index."""
    p = Path(path)
    names = {d.name for d in p.iterdir() if d.is_dir()}
    index: dict = {}
    if (p / "model_index.json").is_file():
        index = json.loads((p / "model_index.json").read_text())
        listed = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        names &= listed | {"unet", "scheduler"}
    for needed in ("unet", "scheduler", "text_encoder", "tokenizer", "vae"):
        if needed not in names:
            raise UserError(f"model path '{path}' has no {needed}/ folder; is it an SD/SDXL-layout checkpoint?")
    return names, index


ADAPTERS.add("sd", SDAdapter, "Stable Diffusion 1.x/2.x and SDXL (UNet, epsilon/v-prediction, DDIM with eta)")
