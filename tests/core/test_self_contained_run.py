"""A run directory is self-contained: its config.yaml holds every option (defaults written out) and absolute paths,
so `mmgrpo sample --run`, `mmgrpo export` and a resume work from any directory."""

from __future__ import annotations

import json
import shutil

import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.policies.models.sd3 import SD3Adapter
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.train.cli import main as cli_main
from mmgrpo.train.config import config_diff, dump_config, load_config, resolved_config
from mmgrpo.train.export import export_run
from mmgrpo.train.trainer import train


def test_config_yaml_is_resolved_and_the_run_works_from_another_directory(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (home / "models").mkdir(parents=True)
    elsewhere.mkdir()
    save_tiny_sd3(home / "models" / "tiny")
    (home / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    (home / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "pipeline": "text_to_image",
                "policy": {"options": {"family": "sd3", "path": "models/tiny", "num_steps": 2, "lora_rank": 2}},
                "data": {"options": {"prompts": "prompts.txt", "heldout_prompts": ""}},
                "rewards": [{"name": "jpeg_incompressibility"}],
                "run": {"output_dir": "runs", "name": "r"},
                "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "progress": False},
            }
        )
    )
    monkeypatch.chdir(home)
    train(load_config("run.yaml"))
    run = home / "runs" / "r"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    opts = saved["policy"]["options"]
    assert opts["path"] == str(home / "models" / "tiny") and saved["run"]["output_dir"] == str(home / "runs")
    assert saved["data"]["options"]["prompts"] == str(home / "prompts.txt")
    assert opts["lora_targets"] == SD3Adapter.lora_targets and "sde" in opts and "lora_alpha" in opts  # defaults
    assert opts["family"] == "sd3" and saved["data"]["options"]["heldout_prompts"] == ""  # names stay names
    assert saved["rewards"][0]["options"] == {"quality": 95}  # the reward factory's defaults too

    monkeypatch.chdir(elsewhere)  # the run from another directory: sample, export, resume
    assert cli_main(["sample", "--run", str(run), "--prompts", "a red circle", "--best-of", "2",
                     "--reward", "jpeg_incompressibility", "--steps", "2", "--out", "best"]) == 0  # fmt: skip
    assert (elsewhere / "best" / "scores.json").is_file()
    out = export_run(run, elsewhere / "export")
    assert any(k.startswith("transformer.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    resumed = train(load_config(run / "config.yaml", [f"resume={run}", "trainer.max_steps=2"]))
    assert resumed.step == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resolving_is_idempotent_and_keeps_bare_names_and_missing_paths(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "sd3").mkdir()  # a folder named like a family must not turn `family: sd3` into a path
    cfg = load_config(
        None,
        base={
            "pipeline": "text_to_image",
            "policy": {"options": {"family": "sd3", "path": "org/hub-model"}},  # not local: a hub id, kept
            "data": {"options": {"prompts": "data.jsonl"}},
            "rewards": [{"name": "jpeg_incompressibility", "options": {"quality": 50}}],
        },
    )
    once = resolved_config(cfg, tmp_path)
    assert once.policy.options["family"] == "sd3" and once.policy.options["path"] == "org/hub-model"
    assert once.data.options["prompts"] == str(tmp_path / "data.jsonl")
    assert once.rewards[0].options == {"quality": 50}  # the user's value wins over the default
    assert config_diff(once, resolved_config(once, tmp_path)) == []
    (tmp_path / "ds").mkdir()  # a saved Hugging Face dataset (hf:PATH[:SPLIT]): the path part only
    for spec, resolved in [("hf:ds", f"hf:{tmp_path / 'ds'}"), ("hf:ds:test", f"hf:{tmp_path / 'ds'}:test"),
                           ("hf:org/hub-set:train", "hf:org/hub-set:train")]:  # fmt: skip
        cfg.data.options["prompts"] = spec
        assert resolved_config(cfg, tmp_path).data.options["prompts"] == resolved, spec
    shutil.rmtree(tmp_path / "sd3")
    (tmp_path / "c.yaml").write_text(dump_config(once))
    assert config_diff(once, load_config(tmp_path / "c.yaml")) == []
    assert torch.__version__  # the config round-trips through YAML without a model load
