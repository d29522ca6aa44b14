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
from typing import Any

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel
from mmgrpo.core.extras import needs
from mmgrpo.core.losses import k3_kl
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout, rollout_by_size
from mmgrpo.policies.init_lora import merge_peft_lora
from mmgrpo.policies.offpolicy import inject_ground_truth, offpolicy_completions
from mmgrpo.policies.vlm_decode import Decoder
from mmgrpo.policies.vlm_extra import ExtraScoring
from mmgrpo.policies.vlm_families import VLMFamily
from mmgrpo.policies.vlm_inputs import (  # noqa: F401  (re-exported: the media / prompt helpers used to live here)
    R1_SYSTEM_PROMPT,
    PromptInputs,
    chat_messages,
    load_image,
    question_text,
    read_video,
)
from mmgrpo.policies.vlm_load import (  # noqa: F401  (re-exported: the options and the loading path lived here)
    BOX_TOKENS,
    CONFIG_VISION_IDS,
    VISION_TOKENS,
    VLMPolicyOptions,
    detect_family,
    eos_token_ids,
    load_vlm,
    suppressed_ids,
)
from mmgrpo.policies.vlm_scorer import (  # noqa: F401  (re-exported)
    VLMScorer,
    chunked_token_logprobs,
    sample_rows,
    sample_tokens,
    token_entropy,
)


class VLMPolicy(ExtraScoring):
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
        self.all_values: Callable[[list[float]], list[list[float]]] | None = None
        """None, or (set by the trainer when several processes train) ``all_values(values) -> [P][len(values)]``:
        every process's ``values``, as many on each; :meth:`rollout_metrics` reports all processes' rows with it"""
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.adapter = detect_family(model, o.family)
        self.family, self.box_family = self.adapter.name, self.adapter.box_convention
        self.eos_ids = eos_token_ids(self.tokenizer, model)
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
        if o.init_lora:  # an SFT adapter to start from: merged before the trainable one is added
            model = merge_peft_lora(model, o.init_lora, str(path), o.init_lora_sha256)
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
        """``completion/*`` of the sampled rows of every process (:attr:`all_values`; teacher-forced off-policy rows
        left out): length in tokens incl. EOS (mean, max), the truncated fraction (no EOS within
        ``max_new_tokens``) and ``entropy``, the mean over the completion tokens (EOS included, padding not) of the
        entropy of the distribution each was sampled from (nats; logits / temperature without the suppressed ids,
        as the log-probs). Every process calls this together when several train (it was the main process's rows)."""
        lengths, finished = rollout.extras["completion_len"].float(), rollout.extras["finished"].bool()
        entropy = rollout.extras["token_entropy"].float()  # [N, K]
        if "offpolicy_mask" in rollout.extras:
            keep = ~rollout.extras["offpolicy_mask"].bool().to(lengths.device)
            lengths, finished, entropy = lengths[keep], finished[keep], entropy[keep.to(entropy.device)]
        tokens = torch.arange(entropy.shape[1], device=entropy.device)[None] < lengths.to(entropy.device)[:, None]
        n = len(lengths)  # rows, length sum, longest, truncated rows, entropy sum, tokens
        mine = [float(n), float(lengths.sum()), float(lengths.max()) if n else 0.0, float((~finished).sum()),
                float(entropy[tokens].sum()), float(tokens.sum())]  # fmt: skip
        every = self.all_values(mine) if self.all_values is not None else [mine]
        rows, length, _, truncated, ent, toks = (sum(x[i] for x in every) for i in range(6))
        if not rows:
            return {}
        return {
            "completion/length_mean": length / rows,
            "completion/length_max": max(x[2] for x in every),
            "completion/truncated_frac": truncated / rows,
            "completion/entropy": ent / toks if toks else math.nan,
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

    # ------------------------------------------------------------------------------------------ extra models
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
