"""Box conventions (mmgrpo/rewards/boxes.py): hand-computed conversions, IoUs and parses."""

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.rewards.boxes import FAMILIES, box_iou, from_absolute, parse_box, to_absolute


def test_qwen2_vl_grid_to_absolute_and_back():
    # 0..1000 grid of a 640x480 image: x * 640 / 1000, y * 480 / 1000
    # [500, 250, 1000, 750] -> [320, 120, 640, 360]
    assert to_absolute([500, 250, 1000, 750], "qwen2_vl", (640, 480)) == pytest.approx([320, 120, 640, 360])
    assert from_absolute([320, 120, 640, 360], "qwen2_vl", (640, 480)) == pytest.approx([500, 250, 1000, 750])
    # the grid ignores the processor's resize
    assert to_absolute([500, 250, 1000, 750], "qwen2_vl", (640, 480), (320, 240)) == pytest.approx(
        [320, 120, 640, 360]
    )


def test_qwen2_5_vl_resized_pixels_to_original():
    # original 1000x700, resized 500x280: sx = 1000 / 500 = 2, sy = 700 / 280 = 2.5
    # [100, 40, 300, 200] -> [200, 100, 600, 500]
    assert to_absolute([100, 40, 300, 200], "qwen2_5_vl", (1000, 700), (500, 280)) == pytest.approx(
        [200, 100, 600, 500]
    )
    assert from_absolute([200, 100, 600, 500], "qwen2_5_vl", (1000, 700), (500, 280)) == pytest.approx(
        [100, 40, 300, 200]
    )
    # no resize recorded: resized == original, identity
    assert to_absolute([100, 40, 300, 200], "qwen2_5_vl", (1000, 700)) == pytest.approx([100, 40, 300, 200])


def test_absolute_is_identity_without_sizes():
    assert to_absolute([1, 2, 3, 4], "absolute") == [1.0, 2.0, 3.0, 4.0]
    assert from_absolute([1, 2, 3, 4], "absolute") == [1.0, 2.0, 3.0, 4.0]


def test_bad_family_and_sizes_are_user_errors():
    with pytest.raises(UserError, match="qwen2_vl, qwen2_5_vl, absolute"):
        to_absolute([1, 2, 3, 4], "qwen3_vl", (10, 10))
    assert FAMILIES == ("qwen2_vl", "qwen2_5_vl", "absolute")
    with pytest.raises(UserError, match="image_size"):
        to_absolute([1, 2, 3, 4], "qwen2_vl", None)
    with pytest.raises(UserError, match="resized_size"):
        to_absolute([1, 2, 3, 4], "qwen2_5_vl", (10, 10), (0, 10))
    with pytest.raises(UserError, match="4 numbers"):
        to_absolute([1, 2, 3], "absolute")


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # inter 1x1 = 1, union 4 + 4 - 1 = 7
        ([0, 0, 4, 4], [1, 1, 3, 3], 0.25),  # inter 4, union 16 + 4 - 4 = 16
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching edges: inter 0
        ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),  # disjoint
        ([1, 1, 1, 5], [0, 0, 4, 4], 0.0),  # degenerate (zero width)
        ([3, 3, 1, 1], [0, 0, 4, 4], 0.0),  # swapped corners are degenerate
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[10, 20, 30, 40]", [10, 20, 30, 40]),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]', [1, 2, 3, 4]),  # Qwen2.5-VL JSON
        ("<|box_start|>(100,200),(300,400)<|box_end|>", [100, 200, 300, 400]),  # Qwen2-VL
        ("<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>", [1, 2, 3, 4]),
        ("(1.5, 2), (3, 4)", [1.5, 2, 3, 4]),
        ("the box is [5, 6, 7.5, 8] I think", [5, 6, 7.5, 8]),
        ("first [1, 2, 3, 4] then finally [5, 6, 7, 8]", [5, 6, 7, 8]),  # the last one wins
        ("10 20 30 40", [10, 20, 30, 40]),  # exactly four loose numbers
        ("x 1 2 3", None),  # three numbers
        ("1 2 3 4 5", None),  # five loose numbers: ambiguous
        ("no box here", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_parse_then_convert_qwen2_vl_answer():
    # grid (250, 500)-(750, 1000) of a 200x100 image -> (50, 50)-(150, 100)
    box = parse_box("<|box_start|>(250,500),(750,1000)<|box_end|>")
    assert to_absolute(box, "qwen2_vl", (200, 100)) == pytest.approx([50, 50, 150, 100])
