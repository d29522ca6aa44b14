"""The VLM reasoner: a transformers image-text-to-text model as a token policy over chat turns.

R1-style GRPO on vision-language models (DeepSeek-R1, Guo et al. 2025; R1-V; VLM-R1, Shen et al. 2025; Visual-RFT,
Liu et al. 2025): a prompt is a chat turn with images or a video, an action unit is one completion token, and the
policy is the model's next-token distribution. What differs between model families (the class that loads them, M-RoPE
positions, vision features, Qwen3-VL's deepstack, the box convention) is a ``VLMFamily`` adapter
(:mod:`mmgrpo.policies.vlm_families`), picked from the model config's ``model_type`` (``vlm_families/<family>.py``:
qwen2_vl, qwen2_5_vl, qwen3_vl, and generic for any ``AutoModelForImageTextToText`` whose ``get_image_features``
returns the projected features); the teacher-forced scorer is :mod:`mmgrpo.policies.vlm_scorer`.

Rollout of B prompts with G completions each (N = B*G rows, K = ``max_new_tokens`` columns):

1. the chat template and the processor run ONCE per prompt -> token ids [Lp], pixel values, grids, positions;
2. the vision tower runs ONCE per prompt; its features are scattered into the prompt's embeddings [Lp, D];
3. one prefill per prompt (unpadded), the B caches joined into one cache of N rows left-padded to the longest
   prompt (:func:`~mmgrpo.policies.vlm_cache.join_caches`; an attention mask hides the pad slots, each row keeps its
   prompt's positions), and ONE decode loop over all N rows (:mod:`mmgrpo.policies.vlm_decode`), stopping when
   every row has its EOS; prompt b's G rows draw from the prompt's own generator (seeded from
   ``PromptBatch.seeds[b]``), so samples do not depend on the layout; vision tokens
   (pads, start/end), box tokens and ids >= ``len(tokenizer)`` get logit -inf and can never be sampled
   (sampling one would crash the next forward with "Image features and image tokens do not match");
4. ``logp_old [N, K]`` is recomputed by the teacher-forced scorer that ``log_prob`` uses, reusing the features of
   step 2, so the ratio right after rollout is 1 whatever the micro-batch. When the trainer says the rollout feeds
   one optimizer step (``logp_old_from_update``; epochs x minibatches = 1), this forward is skipped: the update's
   own forward runs at the sampling parameters and its ``logp.detach()`` is ``logp_old`` (ratio exactly 1).

Teacher forcing runs per prompt over that prompt's rows: the prompt forwarded ONCE, its keys/values shared by its
rows' completions (right-padded), which a second forward runs (``shared_prefix``; the same maths as forwarding every
row's prompt, which gradient checkpointing falls back to), with explicit positions (the family's: Qwen's
``get_rope_index`` positions, then text positions continuing from max + 1), so a row scores the same alone or with
its group.

Off-policy rows (:mod:`mmgrpo.policies.offpolicy`): when the prompts' meta carry an off-policy completion
(TempSamp-R1's ground truth ``<think>...</think><answer>GT</answer>``, written there by
:mod:`mmgrpo.methods.tempsamp`), it replaces one row of every group (+ EOS) before step 4: it is teacher-forced, its
``logp_old`` is its log-prob under the sampling parameters (ratio 1 at first, like every row), and
``rollout.extras["offpolicy_mask"] [N]`` marks it.

Log-probs are of the distribution sampled from: logits / temperature with suppressed tokens removed (top-p / top-k
truncation is not reflected, as in TRL and verl). They are computed in fp32 from chunks of tokens
(``logsumexp`` minus the gathered logit, each chunk recomputed in backward), so [n, L, V] fp32 never exists at once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.extra import ExtraModel
from mmgrpo.core.extras import needs
from mmgrpo.core.losses import k3_kl
from mmgrpo.core.safe_weights import refuse_pickle_weights
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout, rollout_by_size
from mmgrpo.policies.offpolicy import inject_ground_truth, offpolicy_completions
from mmgrpo.policies.sources import check_source_options, resolve_source
from mmgrpo.policies.vlm_decode import Decoder
from mmgrpo.policies.vlm_families import VLMFamily, resolve_family
from mmgrpo.policies.vlm_inputs import (  # noqa: F401  (re-exported: the media / prompt helpers used to live here)
    R1_SYSTEM_PROMPT,
    PromptInputs,
    chat_messages,
    load_image,
    question_text,
    read_video,
)
from mmgrpo.policies.vlm_scorer import (  # noqa: F401  (re-exported)
    VLMScorer,
    chunked_token_logprobs,
    sample_rows,
    sample_tokens,
    token_entropy,
)

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BOX_TOKENS = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"
)  # fmt: skip
CONFIG_VISION_IDS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index"
)  # fmt: skip


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
    dtype: str = "float32"
    """weights dtype: float32, bfloat16 or float16 (transformers' dtype / torch_dtype; log-prob maths is fp32
    whatever this is)"""
    system_prompt: str = R1_SYSTEM_PROMPT
    """system turn asking for <think>/<answer>; "" keeps the chat template's default system turn"""
    max_new_tokens: int = 128
    """K: longest completion; rows without EOS by then are truncated"""
    temperature: float = 1.0
    """sampling temperature (> 0); log-probs are of logits / temperature"""
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
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise bad_option(f"{p}.temperature", self.temperature, "the sampling temperature must be a finite "
                             "number > 0, e.g. 1.0 (greedy decoding is for evaluation)")  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- the policy


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


def _eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer))


_LOCAL_HINT = (
    "Give a local directory with config.json, model.safetensors and the processor files (see "
    "scripts/make_tiny_vlm.py), or a hub id"
)


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
    kw = {"trust_remote_code": o.trust_remote_code}
    try:
        with src.errors(_LOCAL_HINT):
            config = AutoConfig.from_pretrained(src.path, **src.files(), **kw)
    except ValueError as e:
        raise UserError(f"cannot load a VLM from {key}={src.describe()}: {e}. {_LOCAL_HINT}") from e
    model_cls = resolve_family(config, o.family).model_class()  # an unknown family names itself, not the path
    refuse_pickle_weights(src.path, key, f"transformers.{model_cls.__name__}")  # a hub id: use_safetensors refuses
    try:
        with src.errors(_LOCAL_HINT):
            model = model_cls.from_pretrained(src.path, dtype=dtypes[o.dtype], **src.weights(), **kw)
            processor = AutoProcessor.from_pretrained(src.path, **src.files(), **kw)
    except ValueError as e:
        raise UserError(f"cannot load a VLM from {key}={src.describe()}: {e}. {_LOCAL_HINT}") from e
    return model, processor


class VLMPolicy:
    """Policy protocol over a transformers VLM. Samples: N completion strings (special tokens stripped).

    ``adapter`` is the model's :class:`~mmgrpo.policies.vlm_families.VLMFamily` (positions, vision features,
    deepstack...) and ``family`` its name; ``box_family`` is its box convention for the ``iou`` reward (box
    coordinates are converted only in ``mmgrpo/rewards/boxes.py``).
    """

    def __init__(
        self, model: nn.Module, processor: Any, options: VLMPolicyOptions | None = None, reference: bool = False
    ):
        o = options or VLMPolicyOptions()  # its numbers were checked when it was built (__post_init__)
        self.options, self.processor = o, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.adapter = detect_family(model, o.family)
        self.family, self.box_family = self.adapter.name, self.adapter.box_convention
        self.eos_ids = _eos_ids(self.tokenizer, model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        vocab = model.get_output_embeddings().weight.shape[0]
        suppress = suppressed_ids(self.tokenizer, model.config, vocab, o)
        if o.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref_copy = None
        if reference and o.finetune == "full":
            if not o.reference_copy:
                raise UserError(
                    "loss.beta > 0 with policy.options.finetune=full needs a reference: set "
                    "policy.options.reference_copy=true (a frozen copy of the model) or use finetune=lora"
                )
            ref_copy = copy.deepcopy(model).requires_grad_(False).eval()
        trainable = self._trainable(model, o, self.adapter)
        self.model: nn.Module = VLMScorer(
            trainable, self.adapter, suppress, o.temperature, o.logprob_chunk, shared_prefix=o.shared_prefix
        )
        self.model.ref_model = ref_copy
        self.reference = reference
        self.logp_old_from_update = False
        """set by the trainer around a rollout that feeds one optimizer step: skip step 4's scoring forward
        (``Rollout.logp_old_from_update``)"""

    @staticmethod
    def _trainable(model: nn.Module, o: VLMPolicyOptions, family: VLMFamily) -> nn.Module:
        if o.finetune == "lora":
            with needs("vlm", "LoRA fine-tuning of a VLM (policy.options.finetune=lora)"):
                from peft import LoraConfig, get_peft_model

            targets = o.lora_targets or r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
            lora = LoraConfig(
                r=o.lora_rank, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout, target_modules=targets
            )
            return get_peft_model(model, lora)
        model.requires_grad_(True)
        tower = family.vision_tower(model)
        if o.freeze_vision and tower is not None:
            tower.requires_grad_(False)
        return model

    @classmethod
    def from_pretrained(
        cls, path: str, options: VLMPolicyOptions | None = None, reference: bool = False, device: Any = None
    ) -> VLMPolicy:
        """Load model (safetensors only) and processor from a local directory or hub id (:func:`load_vlm`)."""
        o = options or VLMPolicyOptions(path=str(path))
        model, processor = load_vlm(path, o)
        policy = cls(model, processor, o, reference=reference)
        if device is not None:
            policy.model.to(device)
        return policy

    @property
    def any_process(self) -> Callable[[bool], bool] | None:
        """None, or (set by the trainer when every forward of the model is a collective over the processes, as
        under FSDP) ``any_process(flag) -> bool``: whether ``flag`` is True on any process. The decode loop asks it
        before each token (does any process still have a row without EOS?), so all processes run the same number
        of forwards; rows that are done meanwhile only get padding, as without it."""
        return self._scorer().any_process

    @any_process.setter
    def any_process(self, fn: Callable[[bool], bool] | None) -> None:
        self._scorer().any_process = fn

    @property
    def process_max(self) -> Callable[[list[int]], list[int]] | None:
        """None, or (set by the trainer with :attr:`any_process`) ``process_max(values) -> values``: the
        element-wise maximum of integers over the processes; :meth:`check_media_agrees` compares the processes'
        vision passes with it."""
        return self._scorer().process_max

    @process_max.setter
    def process_max(self, fn: Callable[[list[int]], list[int]] | None) -> None:
        self._scorer().process_max = fn

    def check_media_agrees(self, prompts: list[PromptInputs]) -> None:
        """With collective forwards (FSDP, ZeRO-3), refuse prompts whose vision passes differ between processes.

        Each vision block is a shard unit whose forward every process must run together; a process whose prompts
        need fewer vision passes (text-only prompts, or an image where another has an image and a video) would
        leave the others waiting in the all-gather for ever. The processes compare the number of passes (and,
        when the vision tower trains, so the update recomputes it per prompt, which prompt needs which) before the
        first one, and all stop with the same message."""
        if self.process_max is None:
            return
        passes = [int("pixel_values" in p.vision) + int("pixel_values_videos" in p.vision) for p in prompts]
        key = [sum(passes)]
        if not self._scorer().vision_frozen():
            key.append(sum(n * 3**b for b, n in enumerate(passes)) % (2**61 - 1))
        both = self.process_max(key + [-x for x in key])  # one collective: the maxima of the key and of its negative
        hi, lo = both[: len(key)], [-x for x in both[len(key) :]]
        if hi != lo:
            others = (
                f"the processes need between {lo[0]} and {hi[0]}"
                if lo[0] != hi[0]
                else "the others as many but for other prompts (the vision tower trains: the update recomputes them)"
            )
            raise UserError(
                f"prompts with different media on different processes: this process's {len(prompts)} prompts need "
                f"{key[0]} vision passes, and {others}. Under FSDP or ZeRO-3 every vision block's forward is a "
                "collective that all processes run together, so the run would hang. Give every prompt the same media "
                "(e.g. one image each), or train with DDP (an accelerate config without fsdp / deepspeed) or on one "
                "process"
            )

    # ------------------------------------------------------------------------------------------ prompts
    @property
    def device(self) -> torch.device:
        return next(self._scorer().parameters()).device

    def _scorer(self) -> VLMScorer:
        return getattr(self.model, "module", self.model)

    def messages(self, prompt: Any, n_images: int, has_video: bool) -> list[dict]:
        """Chat messages of a prompt: a str (the question) or a dict {question|text, options?} or {messages}."""
        return chat_messages(prompt, n_images, has_video, self.options.system_prompt)

    def prepare(self, prompt: Any, meta: dict) -> PromptInputs:
        """Chat template + processor, once per prompt; images/video from the prompt dict or meta."""
        o, src = self.options, prompt if isinstance(prompt, dict) else {}
        images = src.get("images", meta.get("images")) or ([meta["image"]] if meta.get("image") is not None else [])
        images = [load_image(im, o.max_pixels) for im in images]
        video = src.get("video", meta.get("video"))
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if video is not None:
            frames, fps = read_video(video, o.fps, o.max_frames, o.max_pixels)
            kwargs["videos"] = [frames]
            kwargs.update(self.adapter.video_kwargs(len(frames), fps))
        text = self.processor.apply_chat_template(
            self.messages(prompt, len(images), video is not None), tokenize=False, add_generation_prompt=True
        )
        enc = self.processor(text=[text], **kwargs)
        dev = self.device
        ids = enc["input_ids"][0].to(dev)
        skip = ("input_ids", "attention_mask", "mm_token_type_ids")
        vision = {k: v.to(dev) for k, v in enc.items() if k not in skip and isinstance(v, torch.Tensor)}
        tt = enc.get("mm_token_type_ids")
        tt = tt[0].to(dev) if tt is not None else None
        positions, nxt = self.adapter.prompt_positions(self._scorer().hf, ids, tt, vision)  # [P, Lp], next
        resized = None
        if "image_grid_thw" in vision:
            patch = getattr(getattr(self.processor, "image_processor", None), "patch_size", 14)
            _, gh, gw = vision["image_grid_thw"][0].tolist()
            resized = (int(gw * patch), int(gh * patch))
        return PromptInputs(ids, positions, nxt, vision, tt, resized)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompt: PromptInputs, G: int, generator: torch.Generator | None, greedy: bool = False):
        """G completions of one prompt: :meth:`sample_batch` of that prompt alone."""
        return self.sample_batch([prompt], G, [generator], greedy)

    @torch.no_grad()
    def sample_batch(
        self, prompts: list[PromptInputs], G: int, generators: list[torch.Generator | None], greedy: bool = False
    ):
        """G completions of each of B prompts decoded together: N = B*G rows, prompt b's rows b*G .. b*G + G - 1.

        1. per prompt, one vision pass and one prefill of its Lp_b tokens (no padding: the computation of the prompt
           alone);
        2. the B prefill caches become one cache of N rows, left-padded to the longest prompt (:func:`join_caches`;
           the pad slots are masked out), each row with its own prompt's positions;
        3. one decode loop: a forward of all N rows per token; prompt b's rows draw from ``generators[b]`` only, so a
           row's tokens do not depend on the other prompts of the batch; the loop stops once every row has its EOS.

        Returns (tokens [N, T] with pad after EOS, lengths [N] incl. EOS, finished [N] bool, entropy [N, T] fp32: of
        the distribution each token was drawn from, :func:`token_entropy` of the logits already computed here; 0 after
        the row's EOS).

        All of it runs as the (wrapped) model's forward (``VLMScorer.forward(run=...)``), so a wrapper's hooks run
        around the pieces it calls (FSDP2 gathers the root unit's embeddings and head there).
        """
        self.check_media_agrees(prompts)
        o = self.options
        decoder = Decoder(self._scorer(), self.adapter, o.max_new_tokens, o.temperature, o.top_p, o.top_k, self.pad_id,
                          self.eos_ids)  # fmt: skip
        return self.model(run=lambda: decoder.run(prompts, G, generators, greedy))

    def _seeded(self, batch: PromptBatch, b: int, generator: torch.Generator | None) -> torch.Generator | None:
        """Prompt b's generator, on the model's device: from its seed, else the caller's generator (one drawn from
        it where it lives elsewhere, e.g. a CPU generator with a model on a GPU, whose sampling needs its own)."""
        if batch.seeds:
            return generator_for(batch.seeds[b], self.device)
        if generator is not None and generator.device != torch.device(self.device):
            return generator_for(int(torch.randint(0, 2**62, (1,), generator=generator)), self.device)
        return generator

    @torch.no_grad()
    def generate(self, batch: PromptBatch, greedy: bool = True) -> list[str]:
        """One completion per prompt (greedy by default: held-out evaluation), all prompts decoded together."""
        prompts = [self.prepare(p, m) for p, m in zip(batch.prompts, batch.meta)]
        gens = [self._seeded(batch, b, None) for b in range(len(prompts))]
        toks, lens, _, _ = self.sample_batch(prompts, 1, gens, greedy)
        return [self._decode(toks[b, : int(lens[b])]) for b in range(len(prompts))]

    def answer_mask(self, comp: torch.Tensor, lengths: torch.Tensor, tag: str = "<answer>") -> torch.Tensor:
        """[N, K] bool: True from the first token after ``tag`` to the row's end; every token if there is no tag.

        Found by bisecting on decoded prefixes ("the prefix holds the tag" only turns true once as it grows), so it
        works whatever the tokenizer splits the tag into, in log2(L) decodes per row.
        """
        N, K = comp.shape
        out = torch.zeros(N, K, dtype=torch.bool)
        for n in range(N):
            L = int(lengths[n])
            start = 0
            if tag in self._decode(comp[n, :L]):
                lo, hi = 1, L  # the shortest prefix holding the tag has length in [lo, hi]
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if tag in self._decode(comp[n, :mid]) else (mid + 1, hi)
                start = lo
            out[n, start:L] = True
        return out

    def _decode(self, ids: torch.Tensor) -> str:
        ids = [i for i in ids.tolist() if i not in self.eos_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ protocol
    @torch.no_grad()
    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        """G completions per prompt; ``batch.group_sizes`` asks prompt b for G_b of them (ragged groups: one decode
        loop per distinct size, :func:`~mmgrpo.core.types.rollout_by_size`; a row's tokens depend only on its
        prompt's seed either way)."""
        if batch.ragged(group_size):
            if self.any_process is not None:
                raise UserError(
                    f"the prompt sampler asks for groups of sizes {batch.group_sizes[:8]}..., which the VLM samples "
                    "in one decode loop per size; with sharded (FSDP) processes every process must run the same "
                    "forwards, so a different set of sizes per process cannot run. Use a sampler with a fixed group "
                    "size (uniform), or DDP / one process"
                )
            out = rollout_by_size(self.rollout, batch, group_size, generator)
            out.extras["prompt_index"] = out.row_group()
            return out
        G, K, dev = (
            (batch.sizes(group_size)[0] if len(batch) else group_size),
            self.options.max_new_tokens,
            self.device,
        )
        prompts = [self.prepare(p, m) for p, m in zip(batch.prompts, batch.meta)]  # processor: once per prompt
        gens = [self._seeded(batch, b, generator) for b in range(len(prompts))]
        toks, lengths, finished, ent = self.sample_batch(prompts, G, gens)  # all B*G rows in one decode loop
        comp = torch.full((len(prompts) * G, K), self.pad_id, dtype=torch.long, device=dev)  # [N, K]
        entropy = torch.zeros(len(prompts) * G, K, device=dev)  # [N, K] fp32
        comp[:, : toks.shape[1]], entropy[:, : toks.shape[1]] = toks, ent
        samples = [self._decode(comp[n, : int(lengths[n])]) for n in range(len(prompts) * G)]
        extras: dict[str, Any] = {}
        offpolicy = offpolicy_completions(batch.meta)  # ([B] texts, position), e.g. TempSamp-R1's ground truths
        if offpolicy is not None:  # before logp_old: the off-policy row's ratio starts at 1 too
            samples, off = inject_ground_truth(samples, G, offpolicy[0], position=offpolicy[1])
            for n in off.nonzero().reshape(-1).tolist():  # teacher-forced: its tokens are the GT's, not sampled
                ids = self._forced_ids(samples[n])
                comp[n], lengths[n], finished[n], entropy[n] = self.pad_id, len(ids), True, 0.0  # nothing sampled
                comp[n, : len(ids)] = torch.tensor(ids, device=dev)
            extras["offpolicy_mask"] = off  # [N] bool
        mask = torch.arange(K, device=dev)[None] < lengths[:, None]  # [N, K]: completion tokens incl. EOS
        if self.options.mask_truncated:
            mask &= finished[:, None]
        if self.options.train_span == "answer":
            mask &= self.answer_mask(comp, lengths).to(dev)
        row_prompts = [p for p in prompts for _ in range(G)]  # N references to B objects
        logp_old = torch.zeros(len(row_prompts), K, device=dev)  # [N, K] fp32
        L = max(int(lengths.max()), 1)
        if not self.logp_old_from_update:  # else the update's own forward gives it (one optimizer step)
            for b in range(len(prompts)):  # the scorer log_prob uses, one prompt's rows per call
                rows = slice(b * G, (b + 1) * G)
                logp_old[rows, :L] = self.model(row_prompts[rows], comp[rows, :L], reuse_features=True)[0].float()
        logp_old = logp_old.masked_fill(~mask, 0.0)
        meta = [self._row_meta(m, p, raw) for p, m, raw in zip(prompts, batch.meta, batch.prompts) for _ in range(G)]
        return Rollout(
            samples=samples,
            logp_old=logp_old.cpu(),
            train_mask=mask.cpu(),
            group_size=G,
            prompts=[p for p in batch.prompts for _ in range(G)],
            meta=meta,
            extras={
                "prompt": row_prompts,
                "prompt_index": torch.arange(len(prompts)).repeat_interleave(G),
                "completion_ids": comp,
                "completion_len": lengths,
                "finished": finished,
                "token_entropy": entropy,
                **extras,
            },
            logp_old_from_update=self.logp_old_from_update,
        )

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """``completion/*`` of this process's sampled rows (teacher-forced off-policy rows left out): length in
        tokens incl. EOS (mean, max), the truncated fraction (no EOS within ``max_new_tokens``) and ``entropy``, the
        mean over the completion tokens (EOS included, padding not) of the entropy of the distribution each was
        sampled from (nats; logits / temperature without the suppressed ids, as the log-probs)."""
        lengths, finished = rollout.extras["completion_len"].float(), rollout.extras["finished"].bool()
        entropy = rollout.extras["token_entropy"].float()  # [N, K]
        if "offpolicy_mask" in rollout.extras:
            keep = ~rollout.extras["offpolicy_mask"].bool().to(lengths.device)
            lengths, finished, entropy = lengths[keep], finished[keep], entropy[keep.to(entropy.device)]
        if not len(lengths):
            return {}
        tokens = torch.arange(entropy.shape[1], device=entropy.device)[None] < lengths.to(entropy.device)[:, None]
        return {
            "completion/length_mean": float(lengths.mean()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": float((~finished).float().mean()),
            "completion/entropy": float(entropy[tokens].mean()),
        }

    @staticmethod
    def _row_meta(meta: dict, prompt: PromptInputs, raw: Any) -> dict:
        """The prompt's meta plus what rewards need: the size the model saw (for boxes; no coordinate conversion)
        and a multiple-choice prompt's options (the listener's candidates, ACRE's shuffle)."""
        out = dict(meta)
        if prompt.resized_size is not None:
            out.setdefault("resized_size", prompt.resized_size)
        if isinstance(raw, dict) and raw.get("options"):
            out.setdefault("options", list(raw["options"]))
        return out

    def fits_completion(self, text: str) -> bool:
        """Whether ``text`` can be teacher-forced as a row: its tokens and EOS fit ``max_new_tokens`` and none is a
        token the policy never samples."""
        try:
            self._forced_ids(text)
        except UserError:
            return False
        return True

    def _forced_ids(self, text: str) -> list[int]:
        """Token ids of a teacher-forced completion: ``text`` then EOS; checked to fit K and to be samplable."""
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in self.eos_ids else self.eos_ids[0]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        K = self.options.max_new_tokens
        if len(ids) > K:
            raise UserError(
                f"the off-policy completion (ground truth) {text!r} is {len(ids)} tokens with EOS; raise "
                f"policy.options.max_new_tokens={K}"
            )
        if bool(self._scorer().suppress[torch.tensor(ids)].any()):
            raise UserError(f"the ground truth {text!r} holds a token the policy never samples (vision / box tokens)")
        return ids

    def log_prob(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None) -> LogProbs:
        rows_l = [int(r) for r in rows.reshape(-1).tolist()]
        comp = rollout.extras["completion_ids"][rows_l]  # [n, K]
        K = comp.shape[1]
        units = torch.arange(K) if units is None else units.reshape(-1).cpu()
        L = max(int(units.max()) + 1 if units.numel() else 1, 1)
        prompts = [rollout.extras["prompt"][i] for i in rows_l]
        logp, ref = self.model(prompts, comp[:, :L], reference=self.reference)  # through the (DDP) wrapper
        cols = units.to(logp.device)
        logp = logp[:, cols].float()  # [n, k]
        kl = k3_kl(logp, ref[:, cols]) if ref is not None else None
        to = rollout.logp_old.device  # the loss meets logp_old and the advantages there (autograd crosses devices)
        return LogProbs(logp=logp.to(to), kl=None if kl is None else kl.to(to))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def value_features(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """The policy's internal state of ``rows`` [n] as features [n, 2 D + 5] (fp32, CPU, no gradient), for value
        probes (POISE): the final hidden state at the prompt's last token, the mean final hidden state over the
        row's completion slots, then token-entropy statistics of the sampled tokens (mean, std, max, min) and
        log(1 + completion length). One teacher-forced forward of each prompt's rows at the current parameters."""
        rows_l = [int(r) for r in rows.reshape(-1).tolist()]
        comp = rollout.extras["completion_ids"][rows_l]  # [n, K]
        lengths = rollout.extras["completion_len"][rows_l].to(comp.device).clamp_min(1)  # [n]
        L = max(int(lengths.max()), 1)
        sc = self._scorer()
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows_l):
            groups.setdefault(id(rollout.extras["prompt"][r]), []).append(i)
        D = sc.hf.get_input_embeddings().weight.shape[1]
        hid = torch.zeros(len(rows_l), 2 * D)

        def hidden() -> None:  # run as the wrapped model's forward (FSDP: its hooks gather the shards)
            for idx in groups.values():
                prompt = rollout.extras["prompt"][rows_l[idx[0]]]
                h = sc.group_hidden(sc.hf, prompt, comp[idx, :L], cached=True).float()
                slots = (torch.arange(L, device=h.device)[None] < lengths[idx][:, None]).float()  # [r, L]
                traj = (h * slots[..., None]).sum(1) / slots.sum(1, keepdim=True)  # [r, D]
                hid[idx] = torch.cat([h[:, 0], traj], dim=-1).cpu()

        self.model(run=hidden)
        ent = rollout.extras["token_entropy"][rows_l].float().cpu()  # [n, K]
        valid = torch.arange(ent.shape[1])[None] < lengths.cpu()[:, None]  # [n, K]
        cnt = valid.sum(1).clamp_min(1).float()
        mean = (ent * valid).sum(1) / cnt
        std = (((ent - mean[:, None]) ** 2) * valid).sum(1).div(cnt).sqrt()
        mx = ent.masked_fill(~valid, float("-inf")).amax(1)
        mn = ent.masked_fill(~valid, float("inf")).amin(1)
        stats = torch.stack([mean, std, mx, mn, torch.log1p(lengths.cpu().float())], dim=1)  # [n, 5]
        return torch.cat([hid, stats], dim=1)

    @torch.no_grad()
    def mean_logprob(self, prompt: Any, meta: dict, texts: list[str]) -> torch.Tensor:
        """Length-normalised log-likelihood of each text (then EOS) as the completion of ``prompt`` under the policy
        (mean token log-prob, no gradient): [c] fp32 on CPU. How well the student "comprehends" a given solution."""
        p = self.prepare(prompt, meta)
        ids = [self._forced_ids(t) for t in texts]
        L = max(len(i) for i in ids)
        comp = torch.full((len(ids), L), self.pad_id, dtype=torch.long, device=self.device)
        for j, i in enumerate(ids):
            comp[j, : len(i)] = torch.tensor(i, device=self.device)
        logp, _ = self.model([p] * len(ids), comp, reuse_features=False)  # [c, L]
        lens = torch.tensor([len(i) for i in ids], device=logp.device)
        valid = torch.arange(L, device=logp.device)[None] < lens[:, None]
        return (torch.where(valid, logp.float(), 0.0).sum(1) / lens).cpu()

    # ------------------------------------------------------------------------------------------ extra models
    def load_frozen(
        self, name: str, path: str, key: str, dtype: str | None = None, revision: str | None = None
    ) -> ExtraModel:
        """A frozen VLM (a teacher) loaded like the policy (:func:`load_vlm`: local folder or hub id, safetensors,
        ``dtype`` default the policy's), on the policy's device, scoring tokens exactly as the policy does (same
        temperature, suppressed ids, chunking): an :class:`~mmgrpo.core.extra.ExtraModel` whose ``handle`` is its
        :class:`VLMScorer`. It reads the policy's prepared prompts, so it must share the policy's tokenizer and
        family (a UserError naming ``key`` otherwise)."""
        o = copy.copy(self.options)
        o.path, o.dtype, o.revision, o.variant = path, dtype or self.options.dtype, revision, None
        model, processor = load_vlm(path, o, key)
        tok = getattr(processor, "tokenizer", processor)
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise UserError(
                f"{key}={path}: its tokenizer differs from the policy's ({len(tok.get_vocab())} vs "
                f"{len(self.tokenizer.get_vocab())} tokens or different ids); a teacher scores the policy's sampled "
                "token ids, so it needs the same tokenizer (a model of the same family and vocabulary)"
            )
        family = detect_family(model, "auto")
        if family.name != self.adapter.name:
            raise UserError(
                f"{key}={path}: a {family.name} model, but the policy is {self.adapter.name}; a teacher reads the "
                "policy's prepared prompts (positions, vision inputs), so it must be of the policy's family"
            )
        sc = self._scorer()
        scorer = VLMScorer(model, self.adapter, sc.suppress.clone(), sc.temperature, sc.chunk,
                           shared_prefix=sc.shared_prefix)  # fmt: skip
        scorer.to(self.device)
        return ExtraModel(name, scorer, scorer)

    def load_generator(self, name: str, path: str, key: str, dtype: str | None = None) -> ExtraModel:
        """A frozen VLM that writes answers (a teacher generating guidance): :func:`load_vlm` with the policy's
        options (its own processor and family, any VLM), on the policy's device; ``handle`` is a :class:`VLMPolicy`
        around it (``handle.generate(batch)``), ``module`` its scorer (memory and time reported)."""
        o = copy.copy(self.options)
        o.path, o.dtype, o.revision, o.variant, o.family = path, dtype or self.options.dtype, None, None, "auto"
        o.finetune, o.gradient_checkpointing = "full", False
        o.max_new_tokens = max(1, self.options.max_new_tokens - 1)  # its answer + EOS must fit the policy's rows
        model, processor = load_vlm(path, o, key)
        gen = VLMPolicy(model, processor, o)
        gen.model.to(self.device)
        return ExtraModel(name, gen.model, gen)

    @torch.no_grad()
    def frozen_log_prob(
        self, extra: ExtraModel, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None,
        prompts: list[PromptInputs] | None = None, with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Token log-probs [n, k] (fp32, no gradient) of the rollout's completions ``rows`` [n] at ``units`` [k]
        under a frozen scorer (``extra.handle``, e.g. :meth:`load_frozen`'s teacher), time counted in ``extra``.

        ``prompts``: n prepared prompts to condition on instead of the rollout's (:meth:`prepare` of another text,
        e.g. the question with its ground truth: a self-teacher); ``extra.handle`` may be the policy's own scorer.
        Vision features are recomputed by that scorer (never the policy's cached ones). ``with_entropy``: also the
        entropy [n, k] of the scorer's distribution at each token (how sure the teacher is), as a tuple."""
        rows_l = [int(r) for r in rows.reshape(-1).tolist()]
        comp = rollout.extras["completion_ids"][rows_l]  # [n, K]
        units = torch.arange(comp.shape[1]) if units is None else units.reshape(-1).cpu()
        L = max(int(units.max()) + 1 if units.numel() else 1, 1)
        prompts = prompts if prompts is not None else [rollout.extras["prompt"][i] for i in rows_l]
        scorer = getattr(extra.handle, "module", extra.handle)
        cols, to = units.to(self.device), rollout.logp_old.device
        with extra.timed():
            if with_entropy:  # run as the handle's forward: a wrapper's hooks run too (FSDP2 gathers the root shards)
                run = lambda: scorer.rows_logprobs_entropy(prompts, comp[:, :L].to(self.device))  # noqa: E731
                logp, ent = extra.handle(run=run)
                return logp[:, cols].to(to), ent[:, cols].to(to)
            logp, _ = scorer(prompts, comp[:, :L].to(self.device), reuse_features=False)
        return logp[:, cols].float().to(to)
