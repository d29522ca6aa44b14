"""Third-party rewards: an installed distribution's entry point, and a dotted path, both usable from YAML."""

import textwrap

import pytest
import torch

from mmgrpo import rewards
from mmgrpo.core.errors import UserError
from mmgrpo.testing.plugins import installed
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

BANDIT = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 4, "num_arms": 3}},
    "trainer": {"max_steps": 1, "prompts_per_step": 2, "group_size": 3, "progress": False},
}


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """Build and install a tiny distribution declaring an ``mmgrpo.rewards`` entry point (into a target dir)."""
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "my_reward_pkg").mkdir()
    (src / "my_reward_pkg" / "__init__.py").write_text(
        textwrap.dedent('''
        import torch

        def arm_is_zero(bonus: float = 1.0):
            """Plugin reward: bonus if arm 0 was chosen."""
            def fn(samples, prompts, meta, ctx):
                return torch.tensor([bonus if int(a) == 0 else 0.0 for a in samples])
            return fn

        def plain(samples, prompts, meta, ctx):
            return [None if i % 2 else 2.0 for i in range(len(samples))]
    ''')
    )
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "my-reward-pkg"
        version = "0.1"
        [project.entry-points."mmgrpo.rewards"]
        arm_is_zero = "my_reward_pkg:arm_is_zero"
        [tool.setuptools]
        packages = ["my_reward_pkg"]
    """)
    )
    with installed(src, tmp_path_factory.mktemp("site")) as target:
        yield target


def test_entry_point_reward_is_listed_and_used_from_yaml(installed_plugin, tmp_path):
    assert "arm_is_zero" in rewards.available()
    fn = rewards.get("arm_is_zero", bonus=3.0)
    assert fn(torch.tensor([0, 1, 0]), None, None, None).tolist() == [3.0, 0.0, 3.0]
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "rewards=[{name: arm_is_zero, options: {bonus: 2.0}}]"],
                      base=BANDIT)  # fmt: skip
    t = train(cfg)
    line = (t.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"reward/arm_is_zero"' in line


def test_dotted_path_reward_from_yaml(installed_plugin, tmp_path):
    # a plain callable by dotted path; None rows are "does not apply"
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "rewards=[{name: my_reward_pkg.plain}]"], base=BANDIT)
    t = train(cfg)
    assert '"reward/my_reward_pkg.plain": 2.0' in (t.run_dir / "metrics.jsonl").read_text()


def test_unknown_reward_lists_known_and_suggests():
    with pytest.raises(UserError, match=r"unknown reward 'jpeg_compresibility'.*did you mean 'jpeg_compressibility'"):
        rewards.get("jpeg_compresibility")
    with pytest.raises(UserError, match="cannot import module 'no_such_pkg'"):
        rewards.get("no_such_pkg.fn")
