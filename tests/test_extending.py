"""docs/extending.md runs: its code blocks become a plug-in distribution, installed, listed, and trained with.

The page's blocks marked ``<!-- file: PATH -->`` are written to a source folder and installed with pip (entry points
and all) into a target folder put on sys.path, as a user's ``pip install`` would. Then ``mmgrpo list`` must show a
part of every kind, and the page's own ``mmgrpo train`` command, a text-to-image run with the plug-in diffusion
family and a VLM run with the plug-in VLM family each train 2 steps.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

from mmgrpo.testing.plugins import installed
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.train.cli import list_entries, main
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
FAST = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.progress=false", "trainer.checkpoint_every=0"]


def doc_files() -> dict[str, str]:
    text = DOC.read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin_src")
    for name, body in doc_files().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(body)
    with installed(src, tmp_path_factory.mktemp("site")) as target:
        yield target


def test_the_page_has_a_part_of_every_kind():
    files = doc_files()
    assert {"pyproject.toml", "mmgrpo_example_plugin/__init__.py"} <= set(files)
    kinds = {"rewards", "estimators", "losses", "families", "vlm_families", "recipes", "methods"}
    assert {f"mmgrpo_example_plugin/{k}.py" for k in kinds} <= set(files)


def test_the_page_names_every_entry_point_group():
    from mmgrpo.core.plugins import ENTRY_POINT_GROUPS

    text = DOC.read_text()
    missing = [g for g in ENTRY_POINT_GROUPS.values() if f"`{g}`" not in text]
    assert not missing, f"docs/extending.md does not list the entry-point groups {missing}"


def test_mmgrpo_list_shows_every_plugin_part(plugin, capsys):
    entries = list_entries()
    expected = {
        "rewards": "prefers_low_arms", "estimators": "rank", "losses": "capped_pg",
        "diffusion_families": "sd3_output_lora", "vlm_families": "qwen2_vl_pixel_boxes", "pipelines": "coin",
        "methods": "optimism",
    }  # fmt: skip
    for kind, name in expected.items():
        assert name in entries[kind], (kind, sorted(entries[kind]))
        assert entries[kind][name].startswith("Example plug-in"), entries[kind][name]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in expected.values())


def test_the_estimator_matches_its_docstring(plugin):
    from mmgrpo.core.advantages import get_estimator

    adv = get_estimator("rank")(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[-1.0, 1.0, 0.0], [0.5, 0.5, -1.0]]))  # ties share rank 1.5 of 2


def test_the_pages_train_command_runs_with_recipe_estimator_loss_reward_and_method(plugin, tmp_path):
    block = DOC.read_text().split("## Trying it")[1]
    command = re.search(r"mmgrpo train (.*?)\n```", block.replace("\\\n", " "), flags=re.S).group(1)
    args = shlex.split(command)
    assert args[0] == "configs/bandit.yaml"
    cfg = load_config(ROOT / args[0], [*args[1:], f"run.output_dir={tmp_path}", *FAST])
    assert (cfg.pipeline, cfg.advantage.estimator, cfg.loss.name) == ("coin", "rank", "capped_pg")
    trainer = train(cfg)
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"optimism/negative_frac"' in lines[0]
    probs = trainer.policy.probs()  # [P, 2]: the reward prefers arm 0
    assert bool((probs[:, 0] > 0.5).all())


def test_the_diffusion_family_plugin_trains_two_steps(plugin, tmp_path):
    ckpt = save_tiny_sd3(tmp_path / "sd3")
    base = {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3_output_lora", "path": ckpt, "num_steps": 2, "lora_rank": 2}},
        "data": {"options": {"heldout_prompts": ""}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2, "lr": 1e-2},
    }
    trainer = train(load_config(None, [f"run.output_dir={tmp_path}", *FAST], base=base))
    assert type(trainer.policy.adapter).__name__ == "SD3OutputLoRA"
    lora = [n for n, p in trainer.policy.unwrapped().named_parameters() if p.requires_grad]
    assert lora and all(".to_out.0." in n or ".to_add_out." in n for n in lora), lora[:4]


def test_the_vlm_family_plugin_trains_two_steps(plugin, tmp_path):
    base = {
        "pipeline": "vlm_reasoning",
        "policy": {"options": {"family": "qwen2_vl_pixel_boxes", "path": str(ROOT / "assets" / "tiny_qwen2_vl"),
                               "max_new_tokens": 8, "lora_rank": 2}},
        "data": {"options": {"num_examples": 8, "eval_examples": 2}},
        "rewards": [{"name": "format"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2},
    }  # fmt: skip
    trainer = train(load_config(None, [f"run.output_dir={tmp_path}", *FAST], base=base))
    assert trainer.policy.family == "qwen2_vl_pixel_boxes" and trainer.policy.box_family == "qwen2_5_vl"
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
