"""The diffusion recipes' evaluation (``text_to_image.make_evaluator``, shared by text_to_video / image_to_video) and
their prompt splits: batches of whole groups with ``ctx.group`` as in training, the trainer's checks on the reward,
only the grid's rows kept, and warnings when the evaluation would score what the policy trains on."""

import math
import warnings

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.pipelines.text_to_image import PromptDataOptions, make_evaluator, read_prompt_splits
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow circle", "a blue square"]


@pytest.fixture(scope="module")
def policy():
    return DiffusionPolicy(tiny_sd3_adapter(0), DiffusionPolicyOptions(num_steps=2))


def test_evaluation_scores_batches_of_whole_groups_with_their_ctx_group(policy):
    calls = []

    def group_rank(samples, prompts, meta, ctx):  # group-aware: ranks each sample within its prompt's group
        calls.append((len(prompts), ctx.group.tolist()))
        means = samples.float().mean(dim=(1, 2, 3))
        return [float((means[ctx.group == g] < means[i]).sum()) for i, g in enumerate(ctx.group.tolist())]

    data = PromptDataOptions(eval_samples_per_prompt=2, eval_batch_size=5, grid_images=3)
    result = make_evaluator(PROMPTS, data, group_rank, "rank", 0)(policy, 0)
    assert calls == [(4, [0, 0, 1, 1])] * 2 + [(2, [0, 0])]  # 5 rows a batch -> 2 whole groups of 2
    assert result.metrics["rank"] == pytest.approx(0.5)  # one of each pair ranks above the other
    assert result.images.shape[0] == 3 and result.images.device.type == "cpu"
    assert result.captions == sorted(p for p in PROMPTS for _ in range(2))[:3]


def test_an_evaluation_reward_returning_inf_stops_with_its_name(policy):
    def inf(samples, prompts, meta, ctx):
        return [math.inf] * len(prompts)

    evaluate = make_evaluator(PROMPTS[:1], PromptDataOptions(eval_samples_per_prompt=1), inf, "inf_reward", 0)
    with pytest.raises(UserError, match=r"reward 'inf_reward' returned non-finite values \(row 0: inf"):
        evaluate(policy, 0)


def test_prompt_splits_warn_when_the_evaluation_scores_training_prompts(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a red circle\ntwo blue squares\n")
    held = tmp_path / "held.txt"
    held.write_text("two blue squares\na green triangle\n")

    def splits(**options) -> tuple[tuple[list[str], list[str]], list[str]]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = read_prompt_splits(PromptDataOptions(**options))
        return out, [str(w.message) for w in seen]

    (tr, ho), said = splits(prompts=str(train), heldout_prompts=str(held))
    assert (tr, ho) == (["a red circle", "two blue squares"], ["two blue squares", "a green triangle"])
    assert said == ["1 of the 2 held-out prompts are training prompts too (the first: 'two blue squares'): the "
                    "evaluation scores prompts the policy trains on"]  # fmt: skip
    (_, ho), said = splits(prompts=str(train))
    assert len(ho) == 153 and len(said) == 1 and "heldout_prompts is the default 'shapes'" in said[0]
    (tr, ho), said = splits()  # the shapes world's disjoint splits: nothing to say
    assert said == [] and not set(tr) & set(ho) and (len(tr), len(ho)) == (615, 153)
    assert splits(prompts=str(train), heldout_prompts="") == ((["a red circle", "two blue squares"], []), [])


def test_evaluation_hands_a_datasets_stored_image_to_the_reward_decoded_as_training_does(policy):
    """hf: prompts keep their images encoded (StoredImage) in meta; training's batches decode them, and so must the
    evaluation (it copied the meta as it was: a reward reading meta['image'] got the encoded form)."""
    import io

    from PIL import Image

    from mmgrpo.data.hf_datasets import StoredImage
    from mmgrpo.data.prompts import Prompt

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    prompt = Prompt("a red circle", {"image": StoredImage.checked(buf.getvalue(), "ref.png", "row 0")})
    seen = []

    def reward(samples, prompts, meta, ctx):
        seen.extend(isinstance(m["image"], Image.Image) for m in meta)
        return [0.0] * len(prompts)

    make_evaluator([prompt], PromptDataOptions(eval_samples_per_prompt=2), reward, "ref", 0)(policy, 0)
    assert seen == [True, True]
