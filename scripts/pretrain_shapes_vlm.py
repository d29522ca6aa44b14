"""Recipe: pretrain the shipped tiny VLM of the shapes world (``assets/shapes_vlm/``).

A Qwen2-VL (Wang et al. 2024) shrunk to CPU size -- ``Qwen2VLForConditionalGeneration`` built from config: a small
ViT (2D RoPE, patch 8, 2x2 patch merger) and a small Qwen2 decoder with M-RoPE -- with a byte-level BPE tokenizer
trained locally on the shapes-QA phrasing (digits split one per token, as Qwen's), the Qwen special tokens and the
``<think>``/``<answer>`` tags, and the real Qwen2-VL processor (a 64x64 image -> 8x8 patches -> 16 image tokens).

Supervised fine-tuning from scratch, vision tower INCLUDED (a random frozen tower carries no usable signal):
teacher-forced cross-entropy on the completion only, in the R1 format the RL recipes reward::

    <think>I see a red circle and a blue square.</think><answer>B</answer>            (multiple choice: a letter)
    <think>I see a red circle.</think><answer>(250,125),(750,625)</answer>           (grounding: Qwen2-VL 0..1000)
    <think>I see a red circle and a blue square.</think><answer>2; yes; yes; no; red; blue</answer>  (checklist)

over fresh TRAIN scenes of :mod:`mmgrpo.data.shapes_qa` every batch (count / colour / position / grounding /
checklist, drawn uniformly). ``checklist`` is PEARL's perception checklist (Zhang et al. 2025, arXiv 2511.18437)
asked EXACTLY as the RL recipe's checklist group asks it (:func:`mmgrpo.methods.pearl.checklist_prompt` of a
multiple-choice scene's example, as ``vlm_reasoning`` draws it: "Answer each question about the image, in order,
separated by ';': 1. How many objects are there? 2. Is there a red circle? ..."), answered with the answer sheet of
:func:`mmgrpo.methods.pearl.checklist_answer` after the scene description (the think part of a checklist target is
always
``describe``); without it the asset scores PEARL's R_p = 0 on every sheet and the fidelity gate skips every update.
The think part lists the scene's objects from left to right (``--think describe``). We tried a fixed sentence per kind
first (``--think template``): with it, the answer letter was the only image-dependent token of a multiple-choice
target, and after 1000 steps x 32 the model still ignored the image (every answer "D", held-out accuracy = the
letter prior); describing the scene gives two image-dependent tokens per object, and the mixed tasks left that
plateau within 500 steps x 16. Prompts are built exactly as
:class:`~mmgrpo.policies.vlm.VLMPolicy` builds them (its ``prepare``: chat template, processor, M-RoPE positions),
with ``system_prompt: ""`` (the template's short default system turn); the completion's positions continue from
the prompt's, as in the policy's scorer, so the RL recipes see the very distribution trained here.

The shipped model is deliberately mediocre (held-out multiple-choice accuracy well above chance 0.25 but far from 1,
grounding mean IoU ~0.2-0.5, checklist R_p between 0 and 1) so that GRPO (configs/shapes_vlm_grpo.yaml,
configs/shapes_grounding_medloc.yaml, PEARL's ``methods: {pearl: ...}``) can improve it on a CPU. The learning
rate is constant after warmup, so a run of S steps is the first S steps of a longer one (``--snapshot-every`` keeps
intermediate models to pick from). Run::

    python -m scripts.pretrain_shapes_vlm --out assets/shapes_vlm [--steps N] [--seed S] [--lr LR] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.data import shapes_qa
from mmgrpo.data.shapes import COLORS, POSITIONS, SHAPES, Scene
from mmgrpo.methods.pearl import (
    checklist_answer,
    checklist_prompt,
    checklist_question,
    checklist_reward,
    split_answers,
)
from mmgrpo.pipelines.vlm_grounding import box_answer, evaluate_grounding
from mmgrpo.policies.vlm import R1_SYSTEM_PROMPT, PromptInputs, VLMPolicy, VLMPolicyOptions
from mmgrpo.rewards.text import answer_or_completion, grade, has_valid_format
from mmgrpo.testing.tiny_vlm import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, REASONING_TAGS
from scripts.shapes_scenes import num_params

BOX_FAMILY = "qwen2_vl"  # the asset is a Qwen2-VL: boxes on the 0..1000 grid
THINK = {
    "count": "I count the {color} {shape}s.",
    "color": "I look at the {shape}.",
    "position": "I find the {color} {shape}.",
    "grounding": "I find the {color} {shape}.",
}
CHECKLIST = "checklist"
KINDS = (*shapes_qa.QA_KINDS, CHECKLIST)
"""pretraining kinds: the shapes-QA question kinds and PEARL's checklist"""
CHECKLIST_MAX_NEW_TOKENS = 64
"""generation budget of a checklist sheet in evaluation (the longest, 3 objects and 8 items, is 33 tokens + EOS)"""


@dataclass
class PretrainVLMConfig:
    """Everything that defines a pretraining run (the CLI exposes each field as ``--field-name``)."""

    image_size: int = 64
    """rendered scene side in pixels (the processor keeps 64x64: 8x8 patches of 8 px, 16 merged tokens)"""
    patch_size: int = 8
    """vision patch side (Qwen2-VL uses 14 on 28-px-aligned images; 8 fits 32..64-px scenes)"""
    vision_dim: int = 96
    vision_depth: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_ffn: int = 384
    bpe_vocab: int = 512
    """BPE vocabulary before the special tokens"""
    think: str = "describe"
    """the think part of the targets: template (a fixed sentence per kind) or describe (the objects, left to right)"""
    kinds: str = "count,color,position,grounding,checklist"
    """question kinds drawn uniformly for every training scene (comma separated; checklist: PEARL's checklist sheet)"""
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    """linear warmup steps, then a constant lr (so a shorter run is a prefix of a longer one)"""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    """model initialisation and training-scene order"""
    split_seed: int = 0
    """seed of the shapes-QA scene split and scene generator (the recipes use the same, 0)"""
    heldout_fraction: float = 0.1
    eval_per_kind: int = 100
    """held-out examples of each kind in the final evaluation"""
    eval_every: int = 0
    """evaluate (eval_per_kind // 4 per kind) every this many steps; 0 = only at the end"""
    snapshot_every: int = 0
    """also save the model every this many steps under OUT/snapshots/step_NNNNNN (0 = off)"""
    time_budget_min: float = 0.0
    """stop early after this many minutes of training (0 = off)"""
    threads: int = 1
    """torch.set_num_threads; 1 because on the shared 2-core machine 2 threads made a batch-32 step 4-8x SLOWER
    (1.2-3.0 s vs 0.31 s, measured: OpenMP workers spin while descheduled); 2 on an idle machine"""

    def __post_init__(self) -> None:
        bad = [k for k in self.kind_list() if k not in KINDS]
        if bad or not self.kind_list():
            raise UserError(f"kinds={self.kinds!r}: use a comma-separated subset of {', '.join(KINDS)}")
        if self.think not in ("template", "describe"):
            raise UserError(f"think={self.think!r}; use 'describe' (objects left to right) or 'template'")
        if self.image_size % (2 * self.patch_size):
            raise UserError(f"image_size={self.image_size} must be a multiple of 2 * patch_size={2 * self.patch_size}")
        if self.text_hidden % self.text_heads or (self.text_hidden // self.text_heads) % 8:
            raise UserError(f"text_hidden / text_heads = {self.text_hidden}/{self.text_heads} must be a multiple of 8")
        if self.steps < 0 or self.batch_size < 1:
            raise UserError("steps must be >= 0 and batch_size >= 1")

    def kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.kinds.split(",") if k.strip())


# --------------------------------------------------------------------------------------------- tokenizer
def corpus() -> list[str]:
    """Sentences the BPE is trained on: every shapes-QA question, option list, think template and answer form, and
    the checklist questions / answer sheets of a few scenes (built by the RL recipe's own functions)."""
    lines = ["system user assistant You are a helpful assistant.", R1_SYSTEM_PROMPT]
    for c in COLORS:
        for s in SHAPES:
            lines += [
                f"How many {c} {s}s are there? A) 0 B) 1 C) 2 D) 3",
                f"What colour is the {s}? A) red B) green C) blue D) yellow",
                f"Where is the {c} {s}? A) left B) right C) top D) bottom",
                f"Locate the {c} {s}. Is there a {c} {s}? How many objects are there?",
            ]
            lines += [t.format(color=c, shape=s) for t in THINK.values()]
            lines.append(f"I see a {c} {s}, a {c} {s} and a {c} {s}.")
    lines += [" ".join(POSITIONS), "yes no", "(250,125),(750,625) [16, 8, 48, 40]", "0 1 2 3 4 5 6 7 8 9"]
    lines += [" ".join("abcdefghijklmnopqrstuvwxyz"), " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ")]
    lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~")
    for seed in range(32):  # fixed scenes: "Answer each question about the image, ... 1. How many objects ..."
        items = shapes_qa.make_example(seed, None, kinds=shapes_qa.MC_KINDS).checklist
        lines += [checklist_question(items), checklist_answer(items)]
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A ``Qwen2Tokenizer`` over a byte-level BPE trained on :func:`corpus`, with Qwen's special tokens and the
    reasoning tags (deterministic: same corpus, same tokenizer). Qwen's pre-tokenizer splits digits one by one."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    qwen = Qwen2Tokenizer(
        vocab=dict(model["vocab"]), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    qwen.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]})
    qwen.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    return qwen


# ------------------------------------------------------------------------------------------------ models
def build_processor(tokenizer, config: PretrainVLMConfig):
    """The real Qwen2-VL processor with patch ``patch_size`` and a pixel budget that keeps ``image_size`` images."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    side = config.image_size
    pixels = {"min_pixels": (side // 2) ** 2, "max_pixels": side * side}
    kw = {"patch_size": config.patch_size, "merge_size": 2, "temporal_patch_size": 2, **pixels}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_model(config: PretrainVLMConfig, tokenizer):
    """``Qwen2VLForConditionalGeneration`` from config (random init; seed with torch.manual_seed first)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    head = config.text_hidden // config.text_heads
    text = {
        "vocab_size": (len(tokenizer) + 31) // 32 * 32,  # padded like Qwen's; ids >= len(tokenizer) never sampled
        "hidden_size": config.text_hidden,
        "intermediate_size": config.text_ffn,
        "num_hidden_layers": config.text_layers,
        "num_attention_heads": config.text_heads,
        "num_key_value_heads": config.text_kv_heads,
        "max_position_embeddings": 1024,
        # M-RoPE sections (temporal, height, width) in rotary pairs, summing to head / 2 in Qwen2-VL's 2:3:3 ratio
        # (16, 24, 24 for head 128): 4, 6, 6 for head 32
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head // 8, 3 * head // 16, head // 2 - head // 8 - 3 * head // 16],
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    vision = {
        "depth": config.vision_depth,
        "embed_dim": config.vision_dim,
        "hidden_size": config.text_hidden,  # the merger projects to the text width
        "mlp_ratio": 4,
        "num_heads": config.vision_heads,
        "patch_size": config.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    special = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model


def make_policy(model, processor, max_new_tokens: int = 48) -> VLMPolicy:
    """The policy view the RL recipes take of the asset (no adapters, empty system prompt, every weight trainable)."""
    options = VLMPolicyOptions(finetune="full", freeze_vision=False, system_prompt="", max_new_tokens=max_new_tokens)
    return VLMPolicy(model, processor, options)


# ---------------------------------------------------------------------------------------------- the maths
@dataclass(frozen=True)
class ChecklistExample:
    """PEARL's checklist question about a shapes-QA example's scene, asked as the RL recipe's checklist group asks.

    ``example``: the multiple-choice example whose image and ``checklist`` the sheet is about (``vlm_reasoning``
    draws its scenes with ``shapes_qa.make_example(seed, None, ..., kinds=MC_KINDS)``; so does :func:`make_item`).
    """

    example: shapes_qa.QAExample
    kind: str = CHECKLIST

    @property
    def scene(self) -> Scene:
        return self.example.scene

    @property
    def items(self) -> list[list[str]]:
        return self.meta()["checklist"]

    def prompt(self) -> dict:
        """``{"question": "Answer each question about the image, in order, separated by ';': 1. ..."}``"""
        return checklist_prompt(self.example.meta())[0]

    def meta(self) -> dict:
        """The checklist group's meta: the image, ``checklist`` [[question, answer], ...], ``stream: checklist``."""
        return checklist_prompt(self.example.meta())[1]


def make_item(scene_seed: int, kind: str, config: PretrainVLMConfig) -> shapes_qa.QAExample | ChecklistExample:
    """Example of pretraining kind ``kind`` on scene ``scene_seed`` (checklist: on the scene's MC example)."""
    if kind == CHECKLIST:
        ex = shapes_qa.make_example(scene_seed, None, config.split_seed, config.image_size, shapes_qa.MC_KINDS)
        return ChecklistExample(ex)
    return shapes_qa.make_example(scene_seed, kind, config.split_seed, config.image_size)


def describe(scene) -> str:
    """The objects of a scene from left to right: "I see a red circle, a blue square and a green triangle." """
    names = [f"a {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.cx)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"I see {listed}."


def checklist_target(scene: Scene, items) -> str:
    """The completion of a checklist question: ``<think>{describe(scene)}</think><answer>2; yes; no; red</answer>``."""
    return f"<think>{describe(scene)}</think><answer>{checklist_answer(items)}</answer>"


def target_text(ex: shapes_qa.QAExample | ChecklistExample, think: str = "describe") -> str:
    """The R1-format completion of an example: the think part, then the option letter, the Qwen2-VL box or the
    checklist answer sheet.

    ``think``: "template" (a fixed sentence per kind) or "describe" (the scene's objects, left to right); a checklist
    example always describes the scene (:func:`checklist_target`).
    """
    if think not in ("template", "describe"):
        raise UserError(f"think={think!r}; use 'template' or 'describe'")
    if isinstance(ex, ChecklistExample):
        return checklist_target(ex.scene, ex.items)
    color, shape = ex.target
    think = THINK[ex.kind].format(color=color, shape=shape) if think == "template" else describe(ex.scene)
    answer = ex.answer if ex.box is None else box_answer(list(ex.box), BOX_FAMILY, (ex.image_size, ex.image_size))
    return f"<think>{think}</think><answer>{answer}</answer>"


def sft_loss(
    hf, prompts: list[PromptInputs], targets: list[list[int]], pad_id: int, suppress: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher-forced cross-entropy (nats per target token) of ``targets`` after their prompts, in ONE batched forward.

    Row b is prompt b's ids [Lp_b] + target [Lt_b], right-padded to L; positions [3, B, L] are the prompt's M-RoPE
    positions, then ``next_position + t`` for target token t (as VLMPolicy's scorer); the logit at slot Lp_b - 1 + t
    predicts target token t. Images of all rows go through the vision tower together. ``suppress [V]`` (bool)
    removes the tokens the policy never samples from the softmax, so the loss is exactly the policy's -log-prob.
    """
    B = len(prompts)
    lens = [p.input_ids.shape[0] + len(t) for p, t in zip(prompts, targets)]
    L = max(lens)
    ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    pos = torch.zeros(3, B, L, dtype=torch.long)  # [3, B, L]
    labels = torch.full((B, L), -100, dtype=torch.long)  # [B, L]: -100 = not a target
    mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
    for b, (p, t) in enumerate(zip(prompts, targets)):
        Lp, tt = p.input_ids.shape[0], torch.tensor(t, dtype=torch.long)
        ids[b, :Lp], ids[b, Lp : lens[b]] = p.input_ids.cpu(), tt
        pos[:, b, :Lp] = p.positions.cpu()
        pos[:, b, Lp : lens[b]] = p.next_position + torch.arange(len(t))
        labels[b, Lp - 1 : lens[b] - 1] = tt  # slot Lp - 1 + t predicts target token t
        mask[b, : lens[b]] = 1
    pixels = torch.cat([p.vision["pixel_values"] for p in prompts])  # [sum patches, C * 2 * P * P]
    grids = torch.cat([p.vision["image_grid_thw"] for p in prompts])  # [B, 3]
    dev = next(hf.parameters()).device
    out = hf(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
        pixel_values=pixels.to(dev), image_grid_thw=grids.to(dev), use_cache=False,
    )  # fmt: skip
    logits = out.logits.float()  # [B, L, V] fp32
    if suppress is not None:
        logits = logits.masked_fill(suppress.to(dev)[: logits.shape[-1]], float("-inf"))
    return F.cross_entropy(logits.reshape(B * L, -1), labels.to(dev).reshape(-1), ignore_index=-100)


def training_examples(
    step: int, batch_size: int, config: PretrainVLMConfig
) -> list[shapes_qa.QAExample | ChecklistExample]:
    """Batch ``step``: fresh TRAIN scenes (seeds after the first 10^6, kept for the recipes' train pools)."""
    seeds = shapes_qa.train_seeds(
        batch_size, config.split_seed, config.heldout_fraction, start=10**6 + step * batch_size * 2
    )  # 2x stride: a batch of train seeds never runs into the next batch's (at most 10% are skipped)
    rng = np.random.default_rng([config.seed, step])
    kinds = config.kind_list()
    return [make_item(s, kinds[int(rng.integers(len(kinds)))], config) for s in seeds]


# ---------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(policy: VLMPolicy, per_kind: int, config: PretrainVLMConfig, batch: int = 16) -> dict[str, float]:
    """Greedy answers to ``per_kind`` held-out scenes of each kind: MC accuracy / format, grounding IoU / format,
    checklist R_p.

    Returns ``{count: acc, color: acc, position: acc, mc_accuracy: mean of the three, grounding_mean_iou,
    grounding_acc_at_0.5, format (MC and grounding), checklist_reward: mean R_p of the greedy sheets (PEARL's
    pearl_checklist reward), checklist_format}`` (the checklist is asked whatever ``config.kinds`` says).
    """
    seeds = shapes_qa.heldout_seeds(per_kind, config.split_seed, config.heldout_fraction)
    out, formats = {}, []
    for kind in shapes_qa.QA_KINDS:
        exs = [shapes_qa.make_example(s, kind, config.split_seed, config.image_size) for s in seeds]
        pairs = [(e.prompt(), e.meta()) for e in exs]
        if kind == "grounding":
            res = evaluate_grounding(policy, pairs, batch)
            out["grounding_mean_iou"], out["grounding_acc_at_0.5"] = res.metrics["mean_iou"], res.metrics["acc_at_0.5"]
            formats.append(res.metrics["format"])
            continue
        texts = []
        for lo in range(0, len(pairs), batch):
            part = pairs[lo : lo + batch]
            texts += policy.generate(PromptBatch([p for p, _ in part], [m for _, m in part]), greedy=True)
        out[kind] = float(np.mean([grade(answer_or_completion(t), e.answer) for t, e in zip(texts, exs)]))
        formats.append(float(np.mean([has_valid_format(t) for t in texts])))
    out["mc_accuracy"] = float(np.mean([out[k] for k in shapes_qa.MC_KINDS]))
    out["format"] = float(np.mean(formats))
    out["checklist_reward"], out["checklist_format"] = evaluate_checklist(policy, seeds, config, batch)
    return out


def checklist_scores(texts: list[str], items: list) -> list[float]:
    """R_p of each answer sheet, exactly as the ``pearl_checklist`` reward scores a checklist row."""
    return [checklist_reward(split_answers(answer_or_completion(t), len(it)), it) for t, it in zip(texts, items)]


@torch.no_grad()
def evaluate_checklist(
    policy: VLMPolicy, seeds: list[int], config: PretrainVLMConfig, batch: int = 16
) -> tuple[float, float]:
    """(mean R_p, format rate) of the greedy checklist sheets of held-out scenes ``seeds`` (their MC examples)."""
    exs = [make_item(s, CHECKLIST, config) for s in seeds]
    budget = policy.options.max_new_tokens
    policy.options.max_new_tokens = max(budget, CHECKLIST_MAX_NEW_TOKENS)
    try:
        texts = []
        for lo in range(0, len(exs), batch):
            part = exs[lo : lo + batch]
            texts += policy.generate(PromptBatch([e.prompt() for e in part], [e.meta() for e in part]), greedy=True)
    finally:
        policy.options.max_new_tokens = budget
    r_p = checklist_scores(texts, [e.items for e in exs])
    return float(np.mean(r_p)), float(np.mean([has_valid_format(t) for t in texts]))


# ----------------------------------------------------------------------------------------------- pretrain
def save_asset(out: str | Path, model, processor) -> Path:
    """model.safetensors + config + processor/tokenizer files: ``VLMPolicy.from_pretrained(out)`` loads them."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def train(config: PretrainVLMConfig, log=print, snapshot_dir: Path | None = None):
    """Train from scratch; returns (model, processor, history [dict per log])."""
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.bpe_vocab)
    processor = build_processor(tokenizer, config)
    model = build_model(config, tokenizer)
    policy = make_policy(model, processor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    history, ema, t0 = [], None, time.time()
    for step in range(config.steps):
        examples = training_examples(step, config.batch_size, config)
        prompts = [policy.prepare(e.prompt(), e.meta()) for e in examples]  # exactly the RL prompts
        targets = [tokenizer(target_text(e, config.think) + "<|im_end|>").input_ids for e in examples]
        model.train()
        loss = sft_loss(model, prompts, targets, policy.pad_id, policy.model.suppress)
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        minutes = (time.time() - t0) / 60
        done = step + 1
        if done % 50 == 0 or done == config.steps:
            log(json.dumps({"step": done, "loss": round(ema, 4), "minutes": round(minutes, 2)}))
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            model.eval()
            history.append(
                {"step": done, "loss": ema, "minutes": minutes, **evaluate(policy, config.eval_per_kind // 4, config)}
            )
            log(json.dumps(history[-1]))
        if snapshot_dir is not None and config.snapshot_every and done % config.snapshot_every == 0:
            save_asset(snapshot_dir / f"step_{done:06d}", model, processor)
        if config.time_budget_min and minutes >= config.time_budget_min:
            log(f"time budget of {config.time_budget_min} min reached after {done} steps")
            break
    model.eval()
    history.append({"step": step + 1 if config.steps else 0, "loss": ema, "minutes": (time.time() - t0) / 60})
    return model, processor, history


def pretrain(config: PretrainVLMConfig, out: str | Path | None, command: str = "", log=print) -> dict:
    """Train, evaluate on held-out scenes, write ``out`` (if given) with a README and ``summary.json``."""
    torch.set_num_threads(config.threads)
    t0 = time.time()
    snapshots = Path(out) / "snapshots" if out is not None and config.snapshot_every else None
    model, processor, history = train(config, log, snapshots)
    train_minutes = (time.time() - t0) / 60
    policy = make_policy(model, processor)
    t1 = time.time()
    heldout = evaluate(policy, config.eval_per_kind, config)
    summary = {
        "config": dataclasses.asdict(config),
        "params": {"total": num_params(model), "vision": num_params(model.model.visual)},
        "steps_done": history[-1]["step"],
        "train_minutes": round(train_minutes, 2),
        "eval_minutes": round((time.time() - t1) / 60, 2),
        "final_loss": history[-1]["loss"],
        "heldout": heldout,
        "history": history,
        "threads": torch.get_num_threads(),
    }
    if out is not None:
        path = save_asset(out, model, processor)
        (path / "README.md").write_text(readme(summary, command))
        (path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["size_mb"] = round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6, 2)
    return summary


def readme(summary: dict, command: str) -> str:
    """The asset folder's README: what the model is, how it was made, its held-out scores."""
    c, h, p = summary["config"], summary["heldout"], summary["params"]
    n = c["eval_per_kind"]
    evals = [e for e in summary["history"] if "mc_accuracy" in e]
    curve = ""
    if evals:  # the intermediate evaluations (eval_per_kind // 4 scenes per kind)
        points = ", ".join(
            f"{e['step']}: {e['mc_accuracy']:.2f} / {e['grounding_mean_iou']:.2f} / {e['checklist_reward']:.2f}"
            for e in evals
        )
        curve = (
            f"\nLearning curve (step: MC accuracy / mean IoU / checklist R_p, {n // 4} held-out scenes per kind): "
            f"{points}.\n"
        )
    return f"""# shapes_vlm — the shipped tiny VLM of the shapes world

A deliberately small and mediocre Qwen2-VL, the starting point of the VLM GRPO demos
(`configs/shapes_vlm_grpo.yaml`: multiple choice, `configs/shapes_grounding_medloc.yaml`: grounding with the
MedLoc-R1 IoU curriculum). Load it with `VLMPolicy.from_pretrained("assets/shapes_vlm", options)` and
**`system_prompt: ""`** (it was trained with the chat template's default system turn, not the long R1 one).

* `Qwen2VLForConditionalGeneration` built from config, {p["total"]:,} parameters (fp32 safetensors):
  vision tower {p["vision"]:,} ({c["vision_depth"]} blocks, width {c["vision_dim"]}, patch {c["patch_size"]}, 2x2
  merger); decoder {c["text_layers"]} layers, width {c["text_hidden"]}, {c["text_heads"]} heads
  ({c["text_kv_heads"]} KV), MLP {c["text_ffn"]}, M-RoPE.
* tokenizer: byte-level BPE ({c["bpe_vocab"]} + Qwen special tokens + `<think>` `</think>` `<answer>` `</answer>`),
  trained locally on the shapes-QA phrasing; digits are one token each.
* processor: `Qwen2VLProcessor` (patch {c["patch_size"]}, merge 2): a {c["image_size"]}x{c["image_size"]} scene is
  {(c["image_size"] // c["patch_size"]) ** 2} patches -> {(c["image_size"] // c["patch_size"] // 2) ** 2} image tokens.
* answers (think = {c["think"]}): `<think>I see a red circle and a blue square.</think><answer>B</answer>`
  (multiple choice) and `<think>I see a red circle.</think><answer>(x1,y1),(x2,y2)</answer>` (grounding,
  Qwen2-VL's 0..1000 grid); with think = describe the think part lists the objects from left to right.
* PEARL checklists (kind `checklist`{"" if "checklist" in c["kinds"].split(",") else ": NOT in this asset's kinds"}):
  asked exactly as the `vlm_reasoning` recipe's checklist group asks them ("Answer each question about the image,
  in order, separated by ';': 1. How many objects are there? 2. Is there a red circle? ..."), answered
  `<think>I see a red circle and a blue square.</think><answer>2; yes; yes; no; red; blue</answer>`; scored by the
  `pearl_checklist` reward (R_p = fraction of the items answered right).

## How it was made

`{command}` — supervised, teacher-forced cross-entropy on the completion, vision tower trained too;
{summary["steps_done"]} steps x batch {c["batch_size"]} of fresh TRAIN scenes of `mmgrpo/data/shapes_qa.py`
(kinds {c["kinds"]}, split seed {c["split_seed"]}, held-out fraction {c["heldout_fraction"]}), AdamW lr {c["lr"]}
(warmup {c["warmup"]}, then constant), seed {c["seed"]}: **{summary["train_minutes"]} minutes** on
{summary["threads"]} CPU thread(s) of a shared machine, evaluations every {c["eval_every"]} steps (0: none) included.
Final training loss (EMA) {summary["final_loss"]:.4f} nats/token.
{curve}
## Held-out scores (before RL)

{n} held-out scenes per kind (`shapes_qa.heldout_seeds({n})`), greedy decoding:

| kind | metric | value |
|---|---|---|
| count (chance 0.25) | accuracy | {h["count"]:.3f} |
| color (chance 0.25) | accuracy | {h["color"]:.3f} |
| position (chance 0.25) | accuracy | {h["position"]:.3f} |
| multiple choice | mean accuracy | **{h["mc_accuracy"]:.3f}** |
| grounding | mean IoU | **{h["grounding_mean_iou"]:.3f}** |
| grounding | accuracy at IoU >= 0.5 | {h["grounding_acc_at_0.5"]:.3f} |
| all but checklist | format rate | {h["format"]:.3f} |
| checklist (PEARL) | mean R_p of the greedy answer sheets | **{h["checklist_reward"]:.3f}** |
| checklist (PEARL) | format rate | {h["checklist_format"]:.3f} |
"""


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[PretrainVLMConfig, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder, e.g. assets/shapes_vlm (omit to only evaluate)")
    defaults = PretrainVLMConfig()
    for f in dataclasses.fields(PretrainVLMConfig):
        default = getattr(defaults, f.name)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    return PretrainVLMConfig(**args), out


def main(argv: list[str] | None = None) -> dict:
    import sys

    config, out = parse_args(argv)
    command = "python -m scripts.pretrain_shapes_vlm " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = pretrain(config, out, command=command)
    print(json.dumps({k: summary[k] for k in ("params", "steps_done", "train_minutes", "heldout")}))
    return summary


if __name__ == "__main__":
    main()
