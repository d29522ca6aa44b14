"""Tiny REAL Qwen2-VL / Qwen2.5-VL models for tests and the shipped ``assets/tiny_qwen2_vl/`` (no hub access).

Each builder returns ``(model, processor)``: the transformers classes of the family (Qwen2VLForConditionalGeneration +
Qwen2VLProcessor, or the Qwen2.5-VL pair) built from config with ``torch.manual_seed(seed)``, with

- a byte-level BPE tokenizer trained locally (``tokenizers``) on the shapes world's words, digits, letters and
  punctuation, wrapped as ``Qwen2Tokenizer`` with the Qwen special tokens and ``<think>``/``<answer>`` tags;
- a 2-layer text model (hidden 64) whose vocabulary is LARGER than the tokenizer's (like the real Qwen checkpoints:
  151936 logits for 151665 tokens), so ids >= ``len(tokenizer)`` exist and must never be sampled;
- a 1-block vision tower (embed 32, patch 14, spatial merge 2) and the real Qwen image / video processors with a
  small pixel budget (a 64x64 image becomes 4x4 patches -> 4 image tokens).

>>> model, processor = tiny_qwen2_vl()  # doctest: +SKIP
>>> save_tiny(model, processor, "assets/tiny_qwen2_vl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from mmgrpo.data import shapes

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TEXT_HIDDEN = 64
MIN_PIXELS = 56 * 56  # at least 2x2 merged tokens per image
MAX_PIXELS = 112 * 112  # and at most 4x4 merged tokens: keeps the tiny sequences short

# The official Qwen2-VL chat template (images and videos become <|vision_start|><|image_pad|><|vision_end|>).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """Sentences the tiny BPE is trained on: the shapes world's vocabulary, QA phrasing, digits, letters, marks."""

    words = [*shapes.SHAPES, *shapes.COLORS, *shapes.POSITIONS, *shapes.RELATIONS, *shapes.COUNT_WORDS.values()]
    words += [f"{s}s" for s in shapes.SHAPES]
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    lines += [
        "How many red circles are there? A) 1 B) 2 C) 3 D) 4",
        "What colour is the square? Which shape is on the left? Is there a blue triangle above a green square?",
        "Answer with the letter of the correct option. Think step by step, then give the final answer.",
        "You are a helpful assistant. First think about the question in <think> </think> tags, then answer in "
        "<answer> </answer> tags.",
        "<think> I count two red circles, so the answer is B. </think> <answer> B </answer>",
        "yes no true false the a an of in on at is are and or not image picture video frame",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 (12, 34), (56, 78)",
        " ".join("abcdefghijklmnopqrstuvwxyz"),
        " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
    ]
    return lines


@lru_cache(maxsize=1)
def _bpe(vocab_size: int = 384) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on :func:`_corpus` (deterministic: same corpus, same result)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def tiny_tokenizer():
    """A ``Qwen2Tokenizer`` over the tiny BPE, with the Qwen special tokens and the reasoning tags added."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _processor(family: str, tokenizer):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels)
    video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels)
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=QWEN_CHAT_TEMPLATE)


def _model_vocab(tokenizer) -> int:
    """Model vocabulary: the tokenizer's, rounded up to a multiple of 32 plus 32 unused rows (as Qwen pads it)."""
    return (len(tokenizer) + 31) // 32 * 32 + 32


def _text_config(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": _model_vocab(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},  # head 16
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }


def _special_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _finish(model, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model.eval()


def tiny_qwen2_vl(seed: int = 0):
    """(Qwen2VLForConditionalGeneration, Qwen2VLProcessor), tiny and randomly initialised with ``seed``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": TEXT_HIDDEN,  # the merger projects to the text width
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=_text_config(tokenizer), vision_config=vision, **_special_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return _finish(model, tokenizer), _processor("qwen2_vl", tokenizer)


def tiny_qwen2_5_vl(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor), tiny and randomly initialised with ``seed``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,  # 2x2 merged tokens per window
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(text_config=_text_config(tokenizer), vision_config=vision, **_special_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _finish(model, tokenizer), _processor("qwen2_5_vl", tokenizer)


def save_tiny(model, processor, directory: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``processor`` to ``directory``: ``from_pretrained(directory)`` loads them."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


QWEN3_PATCH = 16  # Qwen3-VL's vision tower patches 16x16 (Qwen2-VL's: 14)


def _qwen3_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    factor = QWEN3_PATCH * 2  # patch x spatial merge: one image token per 32x32 pixels
    pixels = {"min_pixels": (2 * factor) ** 2, "max_pixels": (4 * factor) ** 2}  # 2x2 .. 4x4 image tokens
    image = Qwen2VLImageProcessor(patch_size=QWEN3_PATCH, merge_size=2, temporal_patch_size=2, **pixels)
    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    video = Qwen3VLVideoProcessor(patch_size=QWEN3_PATCH, merge_size=2, temporal_patch_size=2, size=size)
    return Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=QWEN_CHAT_TEMPLATE
    )


def tiny_qwen3_vl(seed: int = 0):
    """(Qwen3VLForConditionalGeneration, Qwen3VLProcessor), tiny and randomly initialised with ``seed``.

    Qwen3-VL's own parts are kept: interleaved M-RoPE (``mrope_interleaved``), learned vision position embeddings
    (8x8, interpolated to the grid) and deepstack mergers after both vision blocks, added to the first two decoder
    layers' hidden states at the vision tokens.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    text = _text_config(tokenizer)
    text["head_dim"] = TEXT_HIDDEN // text["num_attention_heads"]  # 16: mrope_section sums to head_dim / 2
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": QWEN3_PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # an 8x8 grid of learned positions
        "deepstack_visual_indexes": [0, 1],
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_special_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    return _finish(model, tokenizer), _qwen3_processor(tokenizer)


def tiny_llava(seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor): the ``generic`` VLM family's test model (1-D positions).

    A 2-layer CLIP vision tower (32x32 images, 8x8 patches -> 16 image tokens, CLS dropped), a 2-layer MLP projector
    and the tiny Qwen2 text model; the image placeholder is ``<|image_pad|>`` so the shared tokenizer and chat
    template serve every family.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_tokenizer()
    text = {**_text_config(tokenizer), "model_type": "qwen2"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}  # plain 1-D RoPE
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=QWEN_CHAT_TEMPLATE,
        image_token="<|image_pad|>",
        num_additional_image_tokens=1,  # the CLS token the default strategy drops
    )
    return _finish(model, tokenizer), processor
