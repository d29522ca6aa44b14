"""Every shipped config in configs/ validates as shipped and trains 1 step.

The step keeps the config's recipe, methods, strategy blocks, loss and advantage settings; only what cannot exist on
a CPU test machine is swapped (tiny checkpoints of the same family, sizes, downloaded reward weights, prompt files):
see :func:`mmgrpo.testing.configs.tiny_overrides`.
"""

import json
import math
from pathlib import Path

import pytest

from mmgrpo.testing.configs import tiny_overrides
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_config_is_listed():
    assert len(CONFIGS) >= 18


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_trains_one_step(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name assets/ relative to the repository
    shipped = load_config(path)  # validation only: the weights it names need not exist
    data = tiny_overrides(read_yaml(path), tmp_path)
    assert data["pipeline"] == shipped.pipeline and data.get("methods") == read_yaml(path).get("methods")
    cfg = load_config(None, base=data)
    assert (cfg.loss, cfg.advantage) == (shipped.loss, shipped.advantage)
    trainer = train(cfg)
    assert trainer.step == 1
    if "family" in shipped.policy.options:  # the tiny checkpoint is of the config's family (SDXL for sdxl_ddpo)
        adapter = trainer.policy.adapter
        assert adapter.family == shipped.policy.options["family"]
        assert getattr(adapter, "xl", False) == (path.stem == "sdxl_ddpo")
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1]
    assert math.isfinite(lines[0]["loss/policy"]), lines[0]
    step = lines[0]
    sides = [k for k in ("loss/clip_frac_low", "loss/clip_frac_high", "loss/clip_frac_dual") if k in step]
    if shipped.loss.name in ("grpo", "gspo"):  # both modalities: the clipped surrogates log each side, summing up
        assert sides[:2] == ["loss/clip_frac_low", "loss/clip_frac_high"], step
        assert sum(step[k] for k in sides) == pytest.approx(step["loss/clip_frac"], abs=1e-6)
    if shipped.pipeline.startswith("vlm_"):  # sampled tokens' entropy: above 0, below uniform over the vocabulary
        assert 0.0 < step["completion/entropy"] < math.log(len(trainer.policy.tokenizer)), step
