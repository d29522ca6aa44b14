"""Shapes-world QA (mmgrpo/data/shapes_qa.py): determinism, answers checked against the scene AND the pixels,
boxes in pixels, checklists, the scene-seed split."""

import numpy as np
import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.data import shapes_qa
from mmgrpo.data.shapes import COLORS, SHAPES, Obj, Scene, in_region, render
from mmgrpo.rewards.shapes import detect


def test_examples_are_deterministic_in_the_seed_and_differ_across_seeds():
    for s in range(12):
        a, b = shapes_qa.make_example(s), shapes_qa.make_example(s)
        assert a == b and np.array_equal(a.image, b.image)  # dataclass equality ignores the image: compare it too
    assert shapes_qa.make_example(5, seed=1) != shapes_qa.make_example(5, seed=0)
    kinds = {shapes_qa.make_example(s).kind for s in range(40)}
    assert kinds == set(shapes_qa.QA_KINDS)  # the kind is drawn from the scene's generator


@pytest.mark.parametrize("size,difficulty", [(32, "normal"), (64, "normal"), (64, "near_miss"), (64, "shuffled")])
def test_multiple_choice_answers_are_right_for_the_scene_and_the_pixels(size, difficulty):
    letters = {k: set() for k in shapes_qa.MC_KINDS}
    for s in range(60):
        for kind in shapes_qa.MC_KINDS:
            ex = shapes_qa.make_example(s, kind, size=size, difficulty=difficulty)
            assert ex.image.shape == (size, size, 3) and ex.answer in "ABCD" and ex.box is None
            chosen = ex.options["ABCD".index(ex.answer)]
            color, shape = ex.target
            objs = ex.scene.objects
            seen = [(d.color, d.shape) for d in detect(ex.image)]  # the pixel verifier, independent of the scene
            if kind == "count":  # "How many red circles are there?"
                assert ex.question == f"How many {color} {shape}s are there?" and sorted(ex.options) == list("0123")
                assert int(chosen) == sum((o.color, o.shape) == (color, shape) for o in objs)
                assert int(chosen) == seen.count((color, shape))
            elif kind == "color":  # "What colour is the square?" -- the square is the only one
                assert ex.question == f"What colour is the {shape}?" and sorted(ex.options) == sorted(COLORS)
                assert [o.color for o in objs if o.shape == shape] == [chosen]
                assert [c for c, sh in seen if sh == shape] == [chosen]
            else:  # "Where is the blue triangle?" -- its centroid is in exactly that one of the four regions
                assert ex.question == f"Where is the {color} {shape}?"
                (obj,) = [o for o in objs if (o.color, o.shape) == (color, shape)]
                hits = [r for r in ("left", "right", "top", "bottom") if in_region(obj.cx, obj.cy, r)]
                assert hits == [chosen]
            letters[kind].add(ex.answer)
    assert all(v == set("ABCD") for v in letters.values()), letters  # every option is sometimes right


def test_hard_scenes_hold_three_objects_of_near_misses():
    near = 0
    for s in range(60):
        for kind in shapes_qa.MC_KINDS:
            ex = shapes_qa.make_example(s, kind, difficulty="near_miss")
            assert ex == shapes_qa.make_example(s, kind, difficulty="near_miss")  # deterministic
            color, shape = ex.target
            objs = [(o.color, o.shape) for o in ex.scene.objects]
            others = [o for o in objs if o != (color, shape)]
            assert len(objs) == 3
            if kind == "color":  # one of each shape, three distinct colours
                assert sorted(sh for _, sh in objs) == sorted(SHAPES) and len({c for c, _ in objs}) == 3
            else:  # every other object shares exactly one of the asked colour and shape
                assert all((c == color) != (sh == shape) for c, sh in others), (kind, ex.target, objs)
                near += len(others)
    assert near >= 60  # most count and position scenes hold near misses
    assert shapes_qa.make_example(3, "count", difficulty="near_miss") != shapes_qa.make_example(3, "count")
    with pytest.raises(UserError, match="difficulty='extreme'"):
        shapes_qa.make_example(0, "count", difficulty="extreme")
    with pytest.raises(UserError, match="grounding"):
        shapes_qa.make_example(0, "grounding", difficulty="near_miss")


def test_shuffled_options_move_the_answer_off_its_usual_letter():
    usual = {"count": shapes_qa.COUNT_OPTIONS, "color": COLORS, "position": shapes_qa.POSITION_OPTIONS}
    orders = set()
    for s in range(40):
        for kind in shapes_qa.MC_KINDS:
            ex, normal = shapes_qa.make_example(s, kind, difficulty="shuffled"), shapes_qa.make_example(s, kind)
            assert ex.scene == normal.scene and ex.question == normal.question  # only the options move
            assert sorted(ex.options) == sorted(usual[kind])
            right = ex.options["ABCD".index(ex.answer)]
            assert right == normal.options["ABCD".index(normal.answer)]  # the same option is right ...
            assert ex.answer != normal.answer  # ... under another letter than the fixed order's
            orders.add(ex.options)
    assert len(orders) > 20  # the order is drawn per scene


def test_pixel_box_by_hand():
    # square at (0.5, 0.5), side 0.25, 64 px: 0.5 -/+ 0.125 = 0.375 .. 0.625 -> 24 .. 40 px
    assert shapes_qa.pixel_box(Obj("square", "red", 0.5, 0.5, 0.25), 64) == (24.0, 24.0, 40.0, 40.0)
    # triangle: centroid 2/3 of the height below the apex: y from 0.5 - 0.2 = 0.3 to 0.5 + 0.1 = 0.6 (x 0.35..0.65)
    x1, y1, x2, y2 = shapes_qa.pixel_box(Obj("triangle", "blue", 0.5, 0.5, 0.3), 64)
    assert (x1, y1, x2, y2) == pytest.approx((0.35 * 64, 0.3 * 64, 0.65 * 64, 0.6 * 64))  # 22.4, 19.2, 41.6, 38.4


def test_grounding_boxes_are_the_objects_pixels():
    for s in range(30):
        ex = shapes_qa.make_example(s, "grounding", size=64)
        color, shape = ex.target
        assert ex.question == f"Locate the {color} {shape}." and ex.answer is None and ex.options == ()
        (obj,) = [o for o in ex.scene.objects if (o.color, o.shape) == (color, shape)]  # the target is unique
        assert ex.box == pytest.approx(shapes_qa.pixel_box(obj, 64))
        alone = render(Scene((obj,)), size=64).astype(float)  # the target drawn alone: measure its pixels
        chroma = alone.max(-1) - alone.min(-1)  # [H, W]: 0 on the white background
        ys, xs = np.nonzero(chroma > 0.5 * chroma.max())  # pixels at least half covered by the object
        x1, y1, x2, y2 = ex.box
        # thin tips (triangle apex, circle poles) cover under half a pixel: 1.5 px of slack
        assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5, (shape, ex.box, xs.min(), xs.max())
        assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5, (shape, ex.box, ys.min(), ys.max())
        assert ex.meta()["box"] == list(ex.box) and ex.meta()["image_size"] == (64, 64)


def test_checklists_are_answered_by_the_scene():
    for s in range(30):
        ex = shapes_qa.make_example(s)
        objs = [(o.color, o.shape) for o in ex.scene.objects]
        assert ex.checklist[0] == ("How many objects are there?", str(len(objs)))
        answers = {}
        for q, a in ex.checklist[1:]:
            words = q.rstrip("?").split()
            if q.startswith("Is there"):  # "Is there a red circle?"
                assert a == ("yes" if (words[-2], words[-1]) in objs else "no")
                answers[a] = True
            else:  # "What colour is the square?"
                assert [c for c, sh in objs if sh == words[-1]] == [a]
        assert answers == {"yes": True, "no": True}
        assert ex.meta()["checklist"] == [list(item) for item in ex.checklist]


def test_split_by_scene_seed_is_disjoint_deterministic_and_about_the_asked_fraction():
    train, held = shapes_qa.train_seeds(500), shapes_qa.heldout_seeds(50)
    assert set(train).isdisjoint(held) and len(set(train)) == 500 and len(set(held)) == 50
    assert train == shapes_qa.train_seeds(500) and held == shapes_qa.heldout_seeds(50)
    assert all(shapes_qa.is_heldout(s) for s in held) and not any(shapes_qa.is_heldout(s) for s in train)
    frac = np.mean([shapes_qa.is_heldout(s) for s in range(5000)])
    assert 0.08 < frac < 0.12  # heldout_fraction 0.1
    assert shapes_qa.train_seeds(3, start=10**6)[0] >= 10**6
    assert shapes_qa.heldout_seeds(20, split_seed=1) != held  # another split seed, another split
    with pytest.raises(UserError, match="heldout_fraction"):
        shapes_qa.is_heldout(0, heldout_fraction=1.0)


def test_user_errors_name_the_bad_value():
    with pytest.raises(UserError, match="unknown question kind 'size'"):
        shapes_qa.make_example(0, "size")
    with pytest.raises(UserError, match="size=16"):
        shapes_qa.make_example(0, size=16)
    with pytest.raises(UserError, match="kinds"):
        shapes_qa.make_examples([0], kinds=("count", "shape"))


def test_a_split_share_that_would_scan_for_hours_is_refused_naming_the_fraction():
    """heldout_fraction 1e-9 drew held-out scene seeds one in a billion (7 us each): the run hung at build."""
    from mmgrpo.data.shapes_qa import heldout_seeds, train_seeds

    with pytest.raises(UserError, match=r"heldout_fraction=1e-09: 3 held-out scenes at a held-out share of 1e-09 need "
                       r"about 3e\+09 scene seeds drawn, more than 10,000,000"):  # fmt: skip
        heldout_seeds(3, heldout_fraction=1e-9)
    with pytest.raises(UserError, match=r"5 train scenes at a train share of 1e-09"):
        train_seeds(5, heldout_fraction=1 - 1e-9)
    assert len(heldout_seeds(3, heldout_fraction=0.5)) == 3 and train_seeds(0, heldout_fraction=1 - 1e-9) == []
