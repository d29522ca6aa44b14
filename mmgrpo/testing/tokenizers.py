"""Locally built tokenizers (no hub): a word-level tokenizer wrapped as a transformers fast tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BASE_WORDS = (
    "a an the of and left right above below top bottom center in on at is are there how many what which "
    "one two three red green blue yellow circle circles square squares triangle triangles color colour shape "
    "image photo picture cat dog"
).split()


def word_tokenizer(
    words: list[str] | None = None,
    max_length: int = 16,
    bos: str = "<|startoftext|>",
    eos: str = "<|endoftext|>",
    unk: str = "<|unk|>",
) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer with BOS/EOS added, padded with EOS (CLIP's convention)."""
    vocab = {bos: 0, eos: 1, unk: 2}
    for w in words or BASE_WORDS:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=eos, model_max_length=max_length
    )
