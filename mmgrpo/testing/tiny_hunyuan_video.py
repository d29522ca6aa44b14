"""A tiny but complete HunyuanVideo checkpoint (transformer, video VAE, Llama + CLIP, tokenizers) built from config.

The Llama tokenizer is a word-level stand-in for Llama-3's: the same pre-tokenizer regex and special tokens, one
vocabulary entry per pre-token. So the pipeline's chat template tokenizes to the same 95-token prefix
(``crop_start``) as with the real tokenizer, and the tiny model runs the real template unchanged.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mmgrpo.policies.models.hunyuan_video import HunyuanVideoAdapter
from mmgrpo.testing.tokenizers import BASE_WORDS, word_tokenizer

# Llama-3's pre-tokenizer (tokenizer.json of Meta-Llama-3): contractions, letters, 1-3 digits, punctuation, newlines
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama3_word_tokenizer(texts: list[str], words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with Llama-3's pre-tokenizer and chat special tokens; BOS added, right-padded.

    The vocabulary holds every pre-token of ``texts`` (e.g. a chat template) and each of ``words`` with and
    without its leading space; anything else is ``<|unk|>``.
    """
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
    vocab = {s: i for i, s in enumerate((*LLAMA3_SPECIALS, "<|unk|>"))}
    pieces = [p for t in texts for part in _outside_specials(t) for p, _ in split.pre_tokenize_str(part)]
    for w in words or BASE_WORDS:
        pieces += [w, f" {w}"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
        unk_token="<|unk|>", model_max_length=4096,
    )  # fmt: skip


def _outside_specials(text: str) -> list[str]:
    for s in LLAMA3_SPECIALS:
        text = text.replace(s, "\0")
    return [p for p in text.replace("{}", "\0").split("\0") if p]


def tiny_hunyuan_video_components(seed: int = 0) -> dict:
    """Components of ``HunyuanVideoPipeline``: latents [4, f, h, w], 8x spatial / 4x temporal VAE."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tok = llama3_word_tokenizer([DEFAULT_PROMPT_TEMPLATE["template"]])
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ))  # fmt: skip
    tok2 = word_tokenizer(max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=8, bos_token_id=tok2.bos_token_id,
        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id,
    ))  # fmt: skip
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )  # fmt: skip
    out = {
        "transformer": transformer,
        # HunyuanVideo's released scheduler config: flow matching with shift 7
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "text_encoder": llama,
        "tokenizer": tok,
        "text_encoder_2": clip,
        "tokenizer_2": tok2,
        "vae": vae,
    }
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


# tiny sizes: 5 frames -> 2 latent frames, 32 x 32 -> 4 x 4 latents; 16 prompt tokens after the crop
TINY_SIZE = {"height": 32, "width": 32, "num_frames": 5}


def tiny_hunyuan_video_adapter(seed: int = 0, **kwargs):

    c = tiny_hunyuan_video_components(seed)
    opts = {**TINY_SIZE, "max_sequence_length": 16, **kwargs}
    return HunyuanVideoAdapter(
        c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["text_encoder_2"], c["tokenizer_2"],
        c["vae"], **opts,
    )  # fmt: skip


def save_tiny_hunyuan_video(path, seed: int = 0) -> str:
    """Write a tiny HunyuanVideo checkpoint in the diffusers folder layout (model_index.json + sub-folders)."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**tiny_hunyuan_video_components(seed))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
