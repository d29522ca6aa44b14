"""bench/learning.py's methods are overrides of the demo config: each must still build into the policy it names."""

import importlib.util
from pathlib import Path

import pytest

from mmgrpo.train.components import PIPELINES
from mmgrpo.train.config import load_config

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


@pytest.mark.parametrize("method", list(learning.METHODS))
def test_method_overrides_build_the_named_objective(method, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo config names assets/shapes_t2i relative to the repository
    cfg = load_config(learning.CONFIG, [f"run.output_dir={tmp_path}", *learning.METHODS[method][1]])
    PIPELINES.load()
    policy = PIPELINES.get(cfg.pipeline).build(cfg, None).policy
    label = learning.METHODS[method][0]
    want = "sde" if "SDE" in label or "G2RPO" in label else "flow_matching" if "AWM" in label else "nft"
    assert policy.opts.objective.name == want and (cfg.loss.name == "nft") == (want == "nft")
    assert type(policy.objective).__name__ == {"sde": "SDEObjective", "flow_matching": "FlowMatchingObjective",
                                               "nft": "NFTObjective"}[want]  # fmt: skip
    ema = getattr(policy.objective, "ema", None)
    assert (ema is not None) == (want == "nft")  # only the demo's nft row samples with an EMA
    if want == "flow_matching":  # the AWM rows keep the demo's 4 draws per sample
        assert policy.opts.objective.timesteps == 4
