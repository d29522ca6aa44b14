"""Strict inputs before anything is written: every bad number, a hostile run name and a non-UTF-8 config file fail at
config load with exit 2 and one paragraph, and no run directory is created."""

import re

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.train.cli import main
from mmgrpo.train.config import load_config

GOOD = """pipeline: bandit
data: {options: {num_prompts: 4, num_arms: 3}}
rewards:
  - name: bandit_arm_value
trainer: {max_steps: 1, prompts_per_step: 2, group_size: 4, progress: false}
"""

BAD = [
    ("run.seed=-1", "run.seed=-1 in"),
    ("run.seed=18446744073709551616", "must be an integer in [0, 2**64 - 1]"),
    ("trainer.lr=.nan", "trainer.lr=nan"),
    ("trainer.lr=.inf", "trainer.lr=inf"),
    ("trainer.lr=-1", "trainer.lr=-1.0"),
    ("trainer.lr=0", "trainer.lr=0.0"),
    ("trainer.adam_betas=[0.9]", "trainer.adam_betas=[0.9]"),
    ("trainer.adam_betas=[0.9, 1.0]", "must be a pair [beta1, beta2] in [0, 1)"),
    ("trainer.adam_betas=[-0.1, 0.9]", "trainer.adam_betas=[-0.1, 0.9]"),
    ("trainer.adam_eps=0", "trainer.adam_eps=0.0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm=0.0"),
    ("trainer.max_grad_norm=.nan", "trainer.max_grad_norm=nan"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay=1.5"),
    ("trainer.ema_every=0", "trainer.ema_every=0"),
    ("trainer.ema_every=8", "shapes the EMA, which is off (trainer.ema_decay: null); set trainer.ema_decay too"),
    ("trainer.ema_warmup=true", "trainer.ema_warmup=true in"),
    ("trainer.prompts_per_step=0", "trainer.prompts_per_step=0"),
    ("trainer.group_size=0", "trainer.group_size=0"),
    ("trainer.group_size=1", "need trainer.group_size >= 2"),
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("trainer.minibatches=0", "trainer.minibatches=0"),
    ("trainer.minibatches=16", "trainer.minibatches=16"),
    ("trainer.micro_batch_size=-3", "trainer.micro_batch_size=-3"),
    ("trainer.micro_batch_size=some", "expected int | 'auto', got 'some'"),
    ("trainer.micro_batch_units=0", "trainer.micro_batch_units=0"),
    ("trainer.rollout_chunks=0", "trainer.rollout_chunks=0"),
    ("trainer.log_every=0", "trainer.log_every=0"),
    ("trainer.eval_every=-1", "trainer.eval_every=-1"),
    ("trainer.checkpoint_every=-5", "trainer.checkpoint_every=-5"),
    ("trainer.sample_every=-1", "trainer.sample_every=-1"),
    ("trainer.warmup_steps=-2", "trainer.warmup_steps=-2"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0"),
    ("trainer.stop_after_steps=0", "trainer.stop_after_steps=0"),
    ("trainer.time_budget_s=0", "trainer.time_budget_s=0.0"),
    ("trainer.time_budget_clock=cpu", "must be 'wall' or 'process'"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0"),
    ("advantage.max_refill_rounds=-1", "advantage.max_refill_rounds=-1"),
    ("loss.options.clip_low=-0.1", "loss.options.clip_low=-0.1"),
    ("loss.options.clip_low=1.5", "loss.options.clip_low=1.5"),
    ("loss.options.clip_high=.nan", "loss.options.clip_high=nan"),
    ("loss.beta=-1", "loss.beta=-1.0"),
    # the recipe's own options (the bandit's here), checked by their dataclass when the config loads
    ("data.options.num_arms=0", "data.options.num_arms=0: a bandit needs at least 2 arms"),
    ("data.options.num_arms=1", "data.options.num_arms=1: a bandit needs at least 2 arms"),
    ("data.options.num_arms=-1", "data.options.num_arms=-1: a bandit needs at least 2 arms"),
    ("data.options.num_prompts=0", "data.options.num_prompts=0: a bandit needs at least 1 prompt"),
    ("data.options.num_prompts=-1", "data.options.num_prompts=-1: a bandit needs at least 1 prompt"),
    ("data.options.value_seed=-1", "data.options.value_seed=-1: a seed is an integer >= 0"),
    ("policy.options.init_std=-1", "policy.options.init_std=-1.0: the std of the random initial logits must be"),
    ("policy.options.init_std=nan", "policy.options.init_std=nan: the std"),
    ("policy.options.init_std=.inf", "policy.options.init_std=inf: the std"),
    ("run.name=../other", "must be one plain folder name"),
    ("run.name=a/b", "must be one plain folder name"),
]


def _train(tmp_path, capsys, config, *overrides):
    code = main(["train", str(config), f"run.output_dir={tmp_path / 'runs'}", *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, named", BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_fails_at_load_in_one_paragraph_before_the_run_dir_exists(tmp_path, capsys, override, named):
    config = tmp_path / "c.yaml"
    config.write_text(GOOD)
    code, err = _train(tmp_path, capsys, config, override)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert named in " ".join(err.split()), err
    assert err.strip().count("\n\n") == 0  # one paragraph (plus the --debug hint line)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "other").exists()


ADVANTAGE_LOSS_BAD = [  # found by fuzzing the loss / advantage / reward-weight options of configs/bandit.yaml: each
    # reached the estimator as a string (TypeError mid-step, the run directory left behind), raised its UserError only
    # in the first step (naming no key, the run directory left behind), or trained on NaN / inf / nothing
    ((), "advantage.options.eps=nan", "advantage.options.eps=nan: must be a finite number > 0"),
    ((), "advantage.options.eps=0", "advantage.options.eps=0.0: must be a finite number > 0"),
    (("advantage.estimator=mc_grpo",), "advantage.options.eps=-1", "advantage.options.eps=-1.0: must be a finite"),
    (("advantage.estimator=mc_grpo",), "advantage.options.scale=iqr", "advantage.options.scale='iqr': mc_grpo's"),
    (("advantage.estimator=dr_grpo",), "advantage.options.eps=.inf", "advantage.options.eps=inf: must be"),
    (("advantage.estimator=batch_std",), "advantage.options.eps=-inf", "advantage.options.eps=-inf: must be"),
    (("advantage.estimator=ngrpo",), "advantage.options.r_max=nan", "advantage.options.r_max=nan: must be a finite"),
    (("advantage.estimator=bnpo",), "advantage.options.r_min=-inf", "advantage.options.r_min=-inf: must be a finite"),
    (
        ("advantage.estimator=bnpo", "advantage.options.r_min=1"),
        "advantage.options.r_max=0",
        "advantage.options.r_max=0.0: must be greater than advantage.options.r_min=1.0",
    ),
    (("advantage.estimator=stratified",), "advantage.options.alpha=nan", "advantage.options.alpha=nan: must lie in"),
    (("advantage.estimator=stratified",), "advantage.options.alpha=-1", "advantage.options.alpha=-1.0: must lie in"),
    (("advantage.estimator=mapo",), "advantage.options.success=inf", "advantage.options.success=inf: must be"),
    (
        ("advantage.estimator=pacs", "loss.name=pacs", "loss.options={}"),
        "advantage.options.beta=0",
        "advantage.options.beta=0.0: must be a finite number > 0",
    ),
    (("advantage.estimator=spo", "sampler=spo"), "advantage.options.eps=nan", "advantage.options.eps=nan: must be"),
    (
        ("advantage.estimator=weighted_grpo", "sampler=pairing"),
        "advantage.options.w_pos=-1",
        "advantage.options.w_pos=-1.0: must be a finite number > 0",
    ),
    (
        ("advantage.estimator=weighted_grpo", "sampler=pairing"),
        "advantage.options.w_neg=nan",
        "advantage.options.w_neg=nan: must be a finite number > 0",
    ),
    (
        ("advantage.shaping=tempsamp_soft",),
        "advantage.shaping_options.tau=nan",
        "advantage.shaping_options.tau=nan: must be a finite number",
    ),
    (
        ("advantage.shaping=tempsamp_soft",),
        "advantage.shaping_options.a1=-1",
        "advantage.shaping_options.a1=-1.0: must be a finite number >= 0",
    ),
    (("advantage.shaping=tempsamp_soft",), "advantage.shaping_options.a2=0", "advantage.shaping_options.a2=0.0: must"),
    (("advantage.shaping=tempsamp_soft",), "advantage.shaping_options.a2=inf", "advantage.shaping_options.a2=inf:"),
    ((), "advantage.min_advantage=nan", "advantage.min_advantage=nan in"),
    ((), "advantage.min_advantage=inf", "advantage.min_advantage=inf in"),
    ((), "loss.beta=nan", "loss.beta=nan in"),
    ((), "loss.beta=inf", "loss.beta=inf in"),
    ((), "loss.adv_clip=inf", "loss.adv_clip=inf in"),
    ((), "loss.options.dual_clip=nan", "loss.options.dual_clip=nan must be > 1 and finite"),
    ((), "loss.options.dual_clip=inf", "loss.options.dual_clip=inf must be > 1 and finite"),
    (
        ("loss.aggregation.name=constant",),
        "loss.aggregation.options.constant=inf",
        "loss.aggregation.options.constant > 0 and finite (got inf)",
    ),
    ((), "rewards.0.weight=nan", "rewards.0.weight=nan in"),
    ((), "rewards.0.weight=-inf", "rewards.0.weight=-inf in"),
    # 1e39 passed and was inf in fp32; 1e20 overflowed the group statistics: advantages 0 on every row, silently
    ((), "rewards.0.weight=1e39", "rewards.0.weight=1e+39 in"),
    ((), "rewards.0.weight=-1e20", "must be a finite number of size at most 1e+15"),
]


@pytest.mark.parametrize("context, override, named", ADVANTAGE_LOSS_BAD, ids=[b[1] for b in ADVANTAGE_LOSS_BAD])
def test_advantage_and_loss_options_fail_at_load_naming_the_key(tmp_path, capsys, context, override, named):
    config = tmp_path / "c.yaml"
    config.write_text(GOOD)
    code, err = _train(tmp_path, capsys, config, *context, override)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert named in " ".join(err.split()), err
    assert err.strip().count("\n\n") == 0
    assert not (tmp_path / "runs").exists()


def test_estimator_and_shaping_options_reach_the_trainer_converted(tmp_path):
    """PyYAML reads 1e-6 (no dot) as a string: the estimator got it as one and failed mid-step (TypeError)."""
    config = tmp_path / "c.yaml"
    config.write_text(GOOD + "advantage: {options: {eps: 1e-6}, shaping: tempsamp_soft, shaping_options: {a1: 1e-2}}")
    cfg = load_config(config)
    assert cfg.advantage.options == {"eps": 1e-6} and cfg.advantage.shaping_options == {"a1": 0.01}
    # 0 and negative weights stay legitimate (0 logs a reward without training on it)
    assert load_config(config, ["rewards.0.weight=0"]).rewards[0].weight == 0.0
    assert load_config(config, ["rewards.0.weight=-1"]).rewards[0].weight == -1.0


REWARD_BAD = [  # found by fuzzing every option of the CPU rewards in the shipped configs: a nan / inf reached the
    # factory as a string (a TypeError naming no key), passed its range checks, or failed in the first step (the run
    # directory left behind); out of range, the shapes verifier scored every image 0
    ("vlm_reasoning_tiny", "rewards.1.options.atol=nan", "rewards.1.options.atol=nan: reward 'accuracy' takes"),
    ("vlm_reasoning_tiny", "rewards.1.options.atol=.inf", "rewards.1.options.atol=inf: reward 'accuracy' takes"),
    ("vlm_reasoning_tiny", "rewards.1.options.atoll=0", "unknown option 'rewards.1.options.atoll'"),
    ("vlm_reasoning_tiny", "rewards.1.options.atol=loose", "rewards.1.options.atol in"),
    ("shapes_grounding_medloc", "rewards.0.options.tau0=nan", "rewards.0.options.tau0=nan: reward 'iou_curriculum'"),
    ("shapes_grounding_medloc", "rewards.2.options.threshold=-inf", "rewards.2.options.threshold=-inf: reward 'iou'"),
    ("shapes_t2i_grpo", "rewards.0.options.connectivity=3", "rewards.0.options.connectivity=3: pixels touch by"),
    ("shapes_t2i_grpo", "rewards.0.options.min_alpha=0", "rewards.0.options.min_alpha=0.0: the alpha a pixel needs"),
    ("shapes_t2i_grpo", "rewards.0.options.min_area=-1", "rewards.0.options.min_area=-1.0: the smallest object"),
    ("shapes_t2i_grpo", "rewards.0.options.max_objects=0", "rewards.0.options.max_objects=0: an image with more"),
    ("shapes_t2i_grpo", "rewards.0.options.max_foreground=0", "rewards.0.options.max_foreground=0.0: the coloured"),
    ("shapes_t2i_grpo", "rewards.0.options.max_stray=-1", "rewards.0.options.max_stray=-1.0: the fraction of a"),
    ("shapes_t2i_grpo", "rewards.0.options.max_stray=nan", "rewards.0.options.max_stray=nan: reward 'shapes' takes"),
    ("vlm_acre", "rewards.1.options.seed=-1", "rewards.1.options.seed=-1: a seed is an integer >= 0"),
    ("vlm_egrpo", "rewards.1.options.alpha=nan", "rewards.1.options.alpha=nan: reward 'entity_credit' takes a"),
    ("vlm_listener", "rewards.0.options.w_lis=inf", "rewards.0.options.w_lis=inf: reward 'vlm_listener' takes a"),
    ("vlm_listener", "rewards.0.options.family=qwen9", "rewards.0.options.family='qwen9': use auto"),
    ("vlm_listener", "rewards.0.options.max_pixels=-1", "rewards.0.options.max_pixels=-1: the listener's images"),
    ("vlm_listener", "rewards.0.options.max_pixels=0", "rewards.0.options.max_pixels=0: the listener's images"),
]


@pytest.mark.parametrize("config, override, match", REWARD_BAD, ids=[b[1] for b in REWARD_BAD])
def test_reward_options_are_checked_when_the_config_loads(config, override, match):
    """No model is loaded: the shipped configs' reward options fail at load, naming rewards.<i>.options.<key>."""
    with pytest.raises(UserError, match=re.escape(match)):
        load_config(f"configs/{config}.yaml", [override])


def test_jpeg_quality_is_checked_when_the_config_loads():
    with pytest.raises(UserError, match=r"rewards.0.options.quality=0: the JPEG quality is an integer in 1..100"):
        load_config("configs/shapes_t2i_grpo.yaml", ["rewards=[{name: jpeg_compressibility, options: {quality: 0}}]"])


def test_a_reward_factory_error_names_the_reward_entry():
    """Range checks a factory makes itself (when the run builds its rewards) name rewards.<i>.options too."""
    from mmgrpo.train.config import RewardSpec
    from mmgrpo.train.scoring import build_rewards

    specs = [RewardSpec(name="format"), RewardSpec(name="accuracy", options={"atol": -1.0})]
    with pytest.raises(UserError, match=r"^rewards.1.options \(accuracy\): accuracy: atol and rtol must be >= 0"):
        build_rewards(specs)
    with pytest.raises(UserError, match=r"^rewards.0.options \(entity_credit\): entity_credit: unknown mode 'exact'"):
        build_rewards([RewardSpec(name="entity_credit", options={"mode": "exact"})])
    from mmgrpo.pipelines.vlm_grounding import check_box_rewards

    cfg = load_config("configs/shapes_grounding_medloc.yaml", ["rewards.2.options.family=qwen2_5_vl"])
    with pytest.raises(UserError, match=r"^rewards.2.options.family='qwen2_5_vl': reward 'iou' would read boxes"):
        check_box_rewards(cfg, "qwen2_vl")


def test_eval_batch_size_of_the_recipe_is_checked(tmp_path):
    with pytest.raises(UserError, match=r"data.options.eval_batch_size=0 in .* must be >= 1"):
        load_config(
            None,
            ["pipeline=text_to_image", "data.options.eval_batch_size=0"],
            base={"rewards": [{"name": "jpeg_compressibility"}]},
        )


T2I_BAD = [  # the text-to-image recipe's options (found by fuzzing configs/shapes_t2i_grpo.yaml): each crashed in the
    # evaluation / sampler with a traceback, or trained on a meaningless setting (NaN samples, an ignored prompt)
    ("data.options.eval_samples_per_prompt=0", "data.options.eval_samples_per_prompt=0: an evaluation needs at least"),
    ("data.options.eval_samples_per_prompt=-1", "data.options.eval_samples_per_prompt=-1: an evaluation needs"),
    ("data.options.eval_max_prompts=-1", r"data.options.eval_max_prompts=-1: must be >= 0; set it to 0 \(all"),
    ("data.options.grid_images=0", "data.options.grid_images=0: a saved grid shows at least 1 image"),
    ("data.options.grid_images=-1", "data.options.grid_images=-1: a saved grid shows at least 1 image"),
    ("data.options.split_seed=-1", "data.options.split_seed=-1: a seed is an integer >= 0"),
    ("policy.options.guidance_scale=0", "policy.options.guidance_scale=0.0: classifier-free guidance must be a"),
    ("policy.options.guidance_scale=-1", "policy.options.guidance_scale=-1.0: classifier-free guidance"),
    ("policy.options.guidance_scale=nan", "policy.options.guidance_scale=nan: classifier-free guidance"),
    ("policy.options.guidance_scale=inf", "policy.options.guidance_scale=inf: classifier-free guidance"),
    ("policy.options.guidance_scale=1e38", r"policy.options.guidance_scale=1e\+38: classifier-free guidance must be"),
    ("policy.options.lora_rank=-1", r"policy.options.lora_rank=-1: must be >= 0; set it to 0 \(full fine-tuning\)"),
    ("policy.options.lora_alpha=0", "policy.options.lora_alpha=0.0: the LoRA scale numerator must be a finite"),
    ("policy.options.lora_alpha=-1", "policy.options.lora_alpha=-1.0: the LoRA scale numerator"),
    ("policy.options.lora_alpha=nan", "policy.options.lora_alpha=nan: the LoRA scale numerator"),
    ("policy.options.height=-1", r"policy.options.height=-1: must be >= 0; set it to 0 \(the model's default\)"),
    ("policy.options.width=-1", "policy.options.width=-1: must be >= 0"),
    ("policy.options.num_frames=-1", "policy.options.num_frames=-1: must be >= 0"),
    ("policy.options.num_steps=0", "policy.options.num_steps=0: must be 1 to 1000"),
    # 10**9 allocated its schedule until the machine's out-of-memory killer ended the run (no paragraph, exit 137)
    ("policy.options.num_steps=1000000000", r"policy.options.num_steps=1000000000: must be 1 to 1000: the schedulers"),
]


@pytest.mark.parametrize("override, match", T2I_BAD, ids=[b[0] for b in T2I_BAD])
def test_text_to_image_options_are_checked_when_the_config_loads(tmp_path, override, match):
    """The policy path does not even exist: the options' dataclasses refuse the value before any model would load."""
    base = {"pipeline": "text_to_image", "rewards": [{"name": "jpeg_compressibility"}],
            "policy": {"options": {"family": "sd3", "path": str(tmp_path / "missing")}}}  # fmt: skip
    with pytest.raises(UserError, match=f"^{match}"):
        load_config(None, [override], base=base)


def test_a_single_row_group_is_allowed_where_the_estimator_says_so(tmp_path):
    cfg = load_config(
        None, ["trainer.group_size=1", "advantage.estimator=ngrpo"], base={"rewards": [{"name": "bandit_arm_value"}]}
    )
    assert cfg.trainer.group_size == 1


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    code, err = _train(tmp_path, capsys, config)
    assert code == 2 and f"config file '{config}' is not UTF-8 text" in " ".join(err.split()), err
    assert "line 6" in err and not (tmp_path / "runs").exists()


def test_a_reward_option_written_beside_its_name_is_pointed_under_options(tmp_path):
    """`rewards: [{name: remote, url: ...}]` (the remote reward's docstring said so) suggested 'rewards.0.name'."""
    with pytest.raises(UserError, match=r"unknown key 'rewards.0.url' .*'url' is an option of reward 'remote': write "
                       r"it under options \(rewards.0.options.url\)"):  # fmt: skip
        load_config(None, [f"run.output_dir={tmp_path}", 'rewards=[{name: remote, url: "http://127.0.0.1:1"}]'],
                    base={"pipeline": "bandit"})  # fmt: skip
    with pytest.raises(UserError, match=r"unknown key 'rewards.0.nmae' .*did you mean 'rewards.0.name'"):
        load_config(
            None, [f"run.output_dir={tmp_path}", "rewards=[{name: remote, nmae: x}]"], base={"pipeline": "bandit"}
        )
