"""The strata method (Stratified GRPO / Dr. MAS strata from data fields), by hand-built rollouts."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.strata import StrataPolicy, count_stratum, meta_stratum
from mmgrpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
NO_MODEL = "policy.options.path=/nonexistent/vlm"


class _Stub:
    """A policy whose rollout has two prompts x 2 rows with meta and text samples."""

    def rollout(self, batch, group_size, generator=None):
        n = len(batch) * group_size
        meta = [m for m in batch.meta for _ in range(group_size)]
        samples = ["<search>a</search><search>b</search>", "x", "<search>c</search>", ""][:n]
        return Rollout(samples=samples, logp_old=torch.zeros(n, 1), train_mask=torch.ones(n, 1, dtype=torch.bool),
                       group_size=group_size, prompts=[p for p in batch.prompts for _ in range(group_size)],
                       meta=meta)  # fmt: skip


def test_strata_come_from_a_meta_field_or_a_count():
    batch = PromptBatch(["q1", "q2"], [{"task": "math"}, {"task": "code"}])
    out = StrataPolicy(_Stub(), meta_key="task").rollout(batch, 2)
    assert out.group_keys == [meta_stratum("math")] * 2 + [meta_stratum("code")] * 2
    assert meta_stratum("math") == meta_stratum("math") != meta_stratum("code")
    out = StrataPolicy(_Stub(), count="<search>").rollout(batch, 2)
    assert out.group_keys == [2, 0, 1, 0]
    assert count_stratum("<tool_call><tool_call>", __import__("re").compile("<tool_call>")) == 2
    with pytest.raises(UserError, match="no meta field 'agent'"):
        StrataPolicy(_Stub(), meta_key="agent").rollout(batch, 2)


def test_strata_options_are_checked_at_load():
    base = [NO_MODEL, "advantage.estimator=stratified"]
    cfg = load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.strata={meta_key: kind}"])
    assert cfg.methods["strata"] == {"meta_key": "kind"}
    with pytest.raises(UserError, match="exactly one of meta_key"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.strata={}"])
    with pytest.raises(UserError, match="not a regular expression"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [*base, "methods.strata={count: '('}"])
    with pytest.raises(UserError, match="set advantage.estimator: stratified"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [NO_MODEL, "methods.strata={meta_key: kind}"])
    with pytest.raises(UserError, match="use meta_key"):
        load_config(REPO / "configs" / "bandit.yaml", ["advantage.estimator=stratified", "methods.strata={count: x}"])
