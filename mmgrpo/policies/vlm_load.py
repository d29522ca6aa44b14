"""A VLM's options and its one loading path.

:class:`VLMPolicyOptions` (the ``policy.options`` block of a VLM pipeline, checked when the config loads),
:func:`load_vlm` (model and processor from a local folder or a hub id, safetensors only, the family's class), and
what the policy derives from a loaded model: its family adapter, the token ids it never samples, its EOS ids. Used by
:class:`~mmgrpo.policies.vlm.VLMPolicy` and by frozen VLMs that must read prompts as the policy does (teachers, the
``vlm_listener`` reward).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.extras import needs
from mmgrpo.core.safe_weights import NO_HUB_KERNELS, refuse_pickle_weights
from mmgrpo.policies.init_lora import digest
from mmgrpo.policies.sources import check_source_options, refuse_cached_lora, refuse_lora_folder, resolve_source
from mmgrpo.policies.vlm_families import VLM_FAMILIES, VLMFamily, resolve_family
from mmgrpo.policies.vlm_inputs import R1_SYSTEM_PROMPT

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BOX_TOKENS = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"
)  # fmt: skip
CONFIG_VISION_IDS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index"
)  # fmt: skip
TEMPERATURES = (1e-2, 1e2)
"""the sampling temperatures ``policy.options.temperature`` accepts, both included. Log-probs are of logits /
temperature in float32: 1e-45 (a float32 denormal: logits / it overflow) or 1e308 (inf in float32: -inf / inf is NaN
on the suppressed ids) made them non-finite, a rollout error blaming fp16 and the learning rate. Within float32's
reach the useful range is narrower: at 0.01 a logit of 100 becomes 1e4, where float32 rounds a log-prob by ~1e-3
(0.1% noise on the ratio of the rollout's and the update's log-probs of a token, 200 times under a clip range of 0.2,
and ten times more for each decade lower; sampling is greedy there anyway); at 100 logits a few units apart differ
by under 0.05: every token about equally likely, and a log-prob's gradient shrinks as 1 / temperature"""


@dataclass
class VLMPolicyOptions:
    __renamed__ = {"model": "path", "lora_r": "lora_rank", "target_modules": "lora_targets"}  # the 0.1 names

    path: str = ""
    """local model directory (safetensors weights + processor), or a hub repository id org/name read through the
    Hugging Face cache (HF_HUB_OFFLINE=1 reads a cached snapshot); docs/models.md"""
    revision: str | None = None
    """hub ids: the branch, tag or commit hash to read (null = the default branch); not for local folders"""
    variant: str | None = None
    """weights variant: read model.<variant>.safetensors (fp16, bf16, ...: what save_pretrained(variant=...)
    writes), in a local folder as on the hub; null = the plain files"""
    family: str = "auto"
    """a registered VLM family (mmgrpo list): qwen2_vl, qwen2_5_vl, qwen3_vl, generic (AutoModelForImageTextToText),
    or a dotted path; auto = the family registered under the model config's model_type, else generic"""
    trust_remote_code: bool = False
    """let transformers run the model repository's own code (only for repositories you trust)"""
    hub_kernels: bool = False
    """let transformers replace layers (RMSNorm, rotary, activations) by the ``kernels`` package's layers downloaded
    from the Hugging Face hub, on a GPU (transformers' ``use_kernels``). Off by default: it is code from the hub, the
    download needs the network at the model's first train / eval switch, and transformers picks some layers for
    inference only, so the rollout and the update may run different code"""
    dtype: str = "float32"
    """weights dtype: float32, bfloat16 or float16 (transformers' dtype / torch_dtype; log-prob maths is fp32
    whatever this is)"""
    system_prompt: str = R1_SYSTEM_PROMPT
    """system turn asking for <think>/<answer>; "" keeps the chat template's default system turn"""
    max_new_tokens: int = 128
    """K: longest completion; rows without EOS by then are truncated"""
    temperature: float = 1.0
    """sampling temperature, in 0.01..100 (TEMPERATURES); log-probs are of logits / temperature"""
    top_p: float = 1.0
    """nucleus sampling threshold (1 = off)"""
    top_k: int = 0
    """sample among the k most likely tokens (0 = off)"""
    mask_truncated: bool = False
    """train_mask all zeros for completions without EOS within max_new_tokens (DAPO overlong filtering)"""
    train_span: Literal["all", "answer"] = "all"
    """which completion tokens the loss trains: all, or answer = from the token after "<answer>" to the end (the
    reasoning keeps its log-probs but gets no credit; rows without "<answer>" train every token, so the format
    is still learned)"""
    suppress_box_tokens: bool = True
    """never sample <|box_start|> & co (set false for Qwen2-VL's native grounding format)"""
    suppress_tokens: list[str] = field(default_factory=list)
    """extra tokens that are never sampled"""
    fps: float = 2.0
    """video: frames per second sampled from a video file"""
    max_frames: int = 16
    """video: at most this many frames (uniformly spread over the clip)"""
    max_pixels: int | None = None
    """pixel budget per image / video frame (resized before the processor); null = the processor's own budget"""
    finetune: str = "lora"
    """lora (peft adapters; reference = adapters disabled) or full"""
    lora_rank: int = 16
    """LoRA rank r (finetune: lora)"""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)"""
    lora_dropout: float = 0.0
    """LoRA dropout; keep 0 so that log_prob in train mode reproduces logp_old"""
    lora_targets: list[str] = field(default_factory=list)
    """LoRA target module names (peft suffix match); empty = the language model's attention projections"""
    init_lora: str = ""
    """a peft LoRA adapter to start from (a folder with adapter_config.json + adapter_model.safetensors, e.g. an SFT
    run's, or its hub id), merged into the base weights as the model loads: the run starts from (and its KL
    reference is) the fine-tuned model; exports then hold merged weights (mmgrpo.policies.init_lora)"""
    init_lora_sha256: str = ""
    """the sha256 of init_lora's adapter_model.safetensors, written into the run's config.yaml as the run starts: its
    resume, mmgrpo sample --run and mmgrpo export refuse an adapter file that changed since"""
    freeze_vision: bool = True
    """full fine-tuning: keep the vision tower frozen"""
    reference_copy: bool = False
    """full fine-tuning with loss.beta > 0: keep a frozen copy of the model as the KL reference"""
    gradient_checkpointing: bool = False
    """recompute decoder activations in backward (less memory, ~30% slower); the update then forwards each row's
    prompt itself (checkpointed layers drop the KV cache that shared_prefix needs)"""
    shared_prefix: bool = True
    """log-probs forward a prompt ONCE for its rows (its keys/values shared by the G completions, gradients summed:
    the same maths as forwarding every row's prompt); false = every row forwards prompt + completion"""
    logprob_chunk: int = 1024
    """tokens per chunk of the fp32 log-softmax (memory: chunk x vocab x 4 bytes)"""

    def with_defaults(self) -> VLMPolicyOptions:
        """These options as a run's config.yaml stores them: ``init_lora_sha256`` the start adapter's digest."""
        if self.init_lora and not self.init_lora_sha256:
            return dataclasses.replace(self, init_lora_sha256=digest(self.init_lora, peft=True))
        return self

    def __post_init__(self) -> None:
        # checked when the config loads (Pipeline.check), before the model does: a bad number here otherwise ends
        # in a torch / peft traceback mid-rollout, or trains silently on a meaningless setting
        check_source_options("policy.options.path", self.revision, self.variant)
        p = "policy.options"
        if self.finetune not in ("lora", "full"):
            raise bad_option(f"{p}.finetune", self.finetune, "use 'lora' or 'full'")
        if self.max_new_tokens < 1:
            raise bad_option(f"{p}.max_new_tokens", self.max_new_tokens,
                             "a completion needs at least 1 token; set it to 1 or more, e.g. 128")  # fmt: skip
        lo, hi = TEMPERATURES
        if not (math.isfinite(self.temperature) and lo <= self.temperature <= hi):
            raise bad_option(f"{p}.temperature", self.temperature, f"the sampling temperature must be in {lo:g}.."
                             f"{hi:g}, e.g. 1.0 (the log-probs are of logits / temperature in float32: beyond "
                             "these the sampled distribution is no longer finite, or is noise; greedy decoding is "
                             "for evaluation)")  # fmt: skip
        if not 0 < self.top_p <= 1:
            raise bad_option(f"{p}.top_p", self.top_p, "the nucleus mass must be in (0, 1]; set it to 1 (off) or "
                             "e.g. 0.9")  # fmt: skip
        if self.top_k < 0:
            raise bad_option(f"{p}.top_k", self.top_k, "must be >= 0; set it to 0 (off) or e.g. 50")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise bad_option(f"{p}.fps", self.fps, "video frames per second must be a finite number > 0, e.g. 2.0")
        if self.max_frames < 1:
            raise bad_option(f"{p}.max_frames", self.max_frames, "a video needs at least 1 frame; e.g. 16")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise bad_option(f"{p}.max_pixels", self.max_pixels, "the pixel budget per image must be >= 1, e.g. "
                             "200704 (448 x 448), or null for the processor's own budget")  # fmt: skip
        if self.logprob_chunk < 1:
            raise bad_option(f"{p}.logprob_chunk", self.logprob_chunk, "must be >= 1 tokens per chunk, e.g. 1024")
        if self.lora_rank < (1 if self.finetune == "lora" else 0):  # full fine-tuning leaves a rank of 0 unused
            raise bad_option(f"{p}.lora_rank", self.lora_rank, "a LoRA rank must be >= 1 with finetune=lora (>= 0, "
                             "unused, with finetune=full); set it to e.g. 16")  # fmt: skip
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad_option(f"{p}.lora_alpha", self.lora_alpha, "the LoRA scale numerator must be a finite number "
                             "> 0 (scale = alpha / rank; 0 would train nothing), e.g. 32")  # fmt: skip
        if not 0 <= self.lora_dropout < 1:
            raise bad_option(f"{p}.lora_dropout", self.lora_dropout, "a dropout probability must be in [0, 1); keep "
                             "0 so that log_prob reproduces logp_old")  # fmt: skip


def detect_family(model: nn.Module, family: str = "auto") -> VLMFamily:
    """The family adapter of a loaded model: ``family`` if given, else from its ``config.model_type``."""
    return resolve_family(model.config, family)


def suppressed_ids(tokenizer, config, model_vocab: int, options: VLMPolicyOptions) -> torch.Tensor:
    """[V] bool: vision tokens, box tokens (option), extra tokens, config's vision ids, ids >= len(tokenizer)."""
    mask = torch.zeros(model_vocab, dtype=torch.bool)
    names = list(VISION_TOKENS) + (list(BOX_TOKENS) if options.suppress_box_tokens else [])
    vocab = tokenizer.get_vocab()
    for name in names + list(options.suppress_tokens):
        if name in vocab:
            mask[vocab[name]] = True
        elif name in options.suppress_tokens:
            raise UserError(f"policy.options.suppress_tokens: {name!r} is not a token of this tokenizer")
    for key in CONFIG_VISION_IDS:
        tid = getattr(config, key, None)
        if isinstance(tid, int) and 0 <= tid < model_vocab:
            mask[tid] = True
    mask[len(tokenizer) :] = True  # rows of the embedding no token maps to (Qwen pads the vocabulary)
    return mask


def eos_token_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, ``<|im_end|>``, the generation config's EOS ids."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer))


_LOCAL_HINT = (
    "Give a local directory with config.json, model.safetensors and the processor files (see "
    "scripts/make_tiny_vlm.py), or a hub id"
)


def _family_key(path_key: str) -> str:
    """The config key of the family that goes with model path key ``path_key``: the policy's (its teachers copy
    the policy's options), or the option next to a reward's model path."""
    return f"{path_key.rpartition('.')[0]}.family" if path_key.startswith("rewards") else "policy.options.family"


def check_family_fits(config: Any, family: str, model_cls: type, where: str, key: str) -> None:
    """A family named in the config must load the checkpoint's ``model_type`` (config.json, read before the
    weights): Qwen2_5_VLForConditionalGeneration over a qwen2_vl checkpoint otherwise ends in transformers' table of
    "Reinit due to size mismatch" and a RuntimeError about ``ignore_mismatched_sizes``. A class that says no model
    type (generic: AutoModelForImageTextToText picks one from the config) fits any."""
    wanted = getattr(getattr(model_cls, "config_class", None), "model_type", "") or ""
    model_type = getattr(config, "model_type", "") or ""
    if family == "auto" or not wanted or not model_type or wanted == model_type:
        return
    fit = model_type if model_type in VLM_FAMILIES else "generic"
    raise bad_option(key, family, f"family {family!r} does not fit the checkpoint's config.json model_type "
                     f"{model_type!r} ({where}): its class {model_cls.__name__} loads model_type {wanted!r}; set "
                     f"{key}={fit} (the family for model_type {model_type!r}) or remove the option (auto picks "
                     "it)")  # fmt: skip


def context_length(config: Any) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` of its text config (or of the config itself)."""
    limit = getattr(getattr(config, "text_config", None), "max_position_embeddings", None) or getattr(
        config, "max_position_embeddings", None
    )
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_context(config: Any, max_new_tokens: int, where: str) -> None:
    """Prompt + completion must fit the model's context: refuse, once the model config is known and before the
    weights load, a ``max_new_tokens`` that leaves no room for a prompt (1e12 used to end in an out-of-memory
    paragraph about micro-batches: the decode cache and the completion buffers are sized by it). The questions of a
    data file are measured against what is left by the recipes (``check_question_lengths``)."""
    limit = context_length(config)
    if limit is not None and max_new_tokens >= limit:
        raise bad_option("policy.options.max_new_tokens", max_new_tokens, f"{where} has a context of {limit} "
                         "tokens (max_position_embeddings of its text config), which must hold the prompt and the "
                         f"completion; set it below {limit} less the prompts' length, e.g. "
                         f"{min(512, limit // 4)}")  # fmt: skip


def load_vlm(path: str, o: VLMPolicyOptions, key: str = "policy.options.path") -> tuple[nn.Module, Any]:
    """(model, processor) from a local directory or a hub id (``o.revision``, ``o.variant``; the HF cache, see
    :mod:`mmgrpo.policies.sources`): safetensors only, the family's class, ``o.dtype``.

    The one loading path of the VLM side: the policy and frozen VLMs that must read prompts as it does (the
    ``vlm_listener`` reward) both use it. ``key`` names the config key in error messages.
    """
    with needs("vlm", "loading a VLM"):
        from transformers import AutoConfig, AutoProcessor

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if o.dtype not in dtypes:
        raise UserError(f"policy.options.dtype={o.dtype!r}; use one of {', '.join(dtypes)}")
    src = resolve_source(path, key, o.revision, o.variant)
    if src.local:  # an mmgrpo LoRA export is an adapter: transformers' words were "Unrecognized model"
        refuse_lora_folder(src.path, key)
    else:
        refuse_cached_lora(src)
    kw = {"trust_remote_code": o.trust_remote_code}
    try:
        with src.errors(_LOCAL_HINT):
            config = AutoConfig.from_pretrained(src.path, **src.files(), **kw)
    except ValueError as e:
        raise UserError(f"cannot load a VLM from {key}={src.describe()}: {e}. {_LOCAL_HINT}") from e
    model_cls = resolve_family(config, o.family).model_class()  # an unknown family names itself, not the path
    check_family_fits(config, o.family, model_cls, f"{key}={src.describe()}", _family_key(key))
    check_context(config, o.max_new_tokens, f"{key}={src.describe()}")
    refuse_pickle_weights(src.path, key, f"transformers.{model_cls.__name__}")  # a hub id: use_safetensors refuses
    try:
        with src.errors(_LOCAL_HINT):
            kernels = {"use_kernels": True} if o.hub_kernels else NO_HUB_KERNELS
            model = model_cls.from_pretrained(src.path, dtype=dtypes[o.dtype], **src.weights(), **kw, **kernels)
            processor = AutoProcessor.from_pretrained(src.path, **src.files(), **kw)
    except ValueError as e:
        raise UserError(f"cannot load a VLM from {key}={src.describe()}: {e}. {_LOCAL_HINT}") from e
    return model, processor
