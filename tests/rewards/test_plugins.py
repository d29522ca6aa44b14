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


def _console_script_path(monkeypatch, cwd):
    """sys.path as the ``mmgrpo`` console script has it: without the working directory (``python -m`` and pytest
    put it there)."""
    import os
    import sys

    def is_cwd(entry):
        try:
            return os.path.samefile(entry or ".", cwd)
        except OSError:
            return False

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not is_cwd(p)])


def test_a_dotted_path_module_in_the_working_directory_loads_from_the_console_script(tmp_path, monkeypatch):
    """``rewards=[{name: myrew.redness}]`` with myrew.py in the working directory said "cannot import module
    'myrew'" from the ``mmgrpo`` console script (``python -m`` worked): the working directory is looked in too,
    after every installed package; a module that is nowhere says where it was looked for and names PYTHONPATH."""
    import sys

    (tmp_path / "cwd_reward_mod.py").write_text("def redness(samples, prompts, meta, ctx):\n    return [1.0] * 2\n")
    _console_script_path(monkeypatch, tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_reward_mod", raising=False)
    with pytest.raises(UserError) as e:
        rewards.get("no_such_reward_mod.fn")
    msg = str(e.value)
    assert msg.startswith("reward 'no_such_reward_mod.fn': cannot import module 'no_such_reward_mod'")
    assert f"looked in the working directory {tmp_path}" in msg and "PYTHONPATH" in msg
    assert str(tmp_path) not in sys.path  # not found there: sys.path is left as it was
    assert rewards.get("cwd_reward_mod.redness")(None, None, None, None) == [1.0, 1.0]
    assert sys.path[-1] == str(tmp_path)  # appended: an installed package of the same name comes first
    sys.modules.pop("cwd_reward_mod")


def test_a_plain_reward_with_a_default_argument_is_not_taken_for_a_factory(tmp_path, monkeypatch):
    """``def r(samples, prompts, meta, ctx=None)`` was called as a factory (only required parameters were counted):
    "bad options {'ctx': None} (missing 3 required positional arguments)". A factory whose options have
    defaults stays one, however many it has, and so does one with three required options and a fourth."""
    import sys

    (tmp_path / "default_ctx_mod.py").write_text(
        textwrap.dedent("""
        def ctx_default(samples, prompts, meta, ctx=None):
            return [float(a) for a in samples]

        def all_defaults(samples=None, prompts=None, meta=None, ctx=None):
            return [1.0 for _ in samples]

        def make(model="x", size=224, batch=8, device="cpu"):
            return ctx_default

        def make_required(path, threshold, scale, device="cpu"):
            return ctx_default

        def positional(a, b, c, d):
            return [1.0 for _ in a]

        def three(samples, prompts, meta):
            return [1.0 for _ in samples]

        def trl(completions, solution=None, **kwargs):
            return [1.0 for _ in completions]
    """)
    )
    _console_script_path(monkeypatch, tmp_path)
    monkeypatch.delitem(sys.modules, "default_ctx_mod", raising=False)
    assert not rewards.is_factory(rewards.resolve("default_ctx_mod.ctx_default"))
    assert not rewards.is_factory(rewards.resolve("default_ctx_mod.all_defaults"))  # named as a reward's arguments
    assert rewards.is_factory(rewards.resolve("default_ctx_mod.make"))
    assert rewards.is_factory(rewards.resolve("default_ctx_mod.make_required"))  # three required options + one
    assert not rewards.is_factory(rewards.resolve("default_ctx_mod.positional"))  # four required: a reward, as before
    assert rewards.is_factory(rewards.resolve("remote")) and rewards.is_factory(rewards.resolve("shapes"))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "rewards=[{name: default_ctx_mod.ctx_default}]"],
                      base=BANDIT)  # fmt: skip
    assert cfg.rewards[0].options == {}
    assert rewards.get("default_ctx_mod.ctx_default")(torch.tensor([2, 0]), None, None) == [2.0, 0.0]
    with pytest.raises(UserError, match="plain callable and takes no options"):
        rewards.get("default_ctx_mod.ctx_default", ctx=1)
    # a reward without ctx reads as a factory; its call failed with "missing 3 required positional arguments"
    with pytest.raises(UserError, match=r"takes \(samples, prompts, meta\), but a reward is called with .*add ctx"):
        rewards.get("default_ctx_mod.three")
    # a TRL reward function read as a factory: "bad options {'solution': None} (missing ... 'completions')"
    with pytest.raises(UserError, match=r"takes \(completions, solution\), a TRL reward function's .*Wrap it"):
        rewards.get("default_ctx_mod.trl")
    sys.modules.pop("default_ctx_mod")


def test_a_factory_that_fails_or_returns_no_reward_is_one_paragraph_naming_the_reward(tmp_path, monkeypatch):
    """A factory raising anything but TypeError (a model file it cannot find, its own assert) was a raw traceback
    in train, serve-reward and sample; a factory returning None, or a dotted path naming a constant, failed only at
    step 0 as "reward raised TypeError: 'NoneType' object is not callable"."""
    import sys

    (tmp_path / "failing_factories_mod.py").write_text(
        textwrap.dedent("""
        NOT_CALLABLE = 42

        def missing_file(path="weights.safetensors"):
            raise FileNotFoundError(f"no such model file: {path}")

        def returns_none(scale=1.0):
            return None

        def asserts(threshold: int = 3):
            assert threshold > 3, "threshold must exceed 3"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "failing_factories_mod", raising=False)
    with pytest.raises(UserError, match=r"^reward 'failing_factories_mod.missing_file' could not be built with "
                       r"options \{'path': 'x'\}: FileNotFoundError: 'no such model file: x'$") as e:  # fmt: skip
        rewards.get("failing_factories_mod.missing_file", path="x")
    assert isinstance(e.value.__cause__, FileNotFoundError)  # --debug shows the factory's traceback
    with pytest.raises(UserError, match="could not be built with options {}: AssertionError: 'threshold must exceed"):
        rewards.get("failing_factories_mod.asserts")
    with pytest.raises(UserError, match=r"'failing_factories_mod.returns_none': its factory returned null \(of "
                       r"type NoneType\), not a reward"):  # fmt: skip
        rewards.get("failing_factories_mod.returns_none")
    with pytest.raises(UserError, match=r"'failing_factories_mod.NOT_CALLABLE' is 42 \(of type int\), not"):
        load_config(None, [f"run.output_dir={tmp_path}", "rewards=[{name: failing_factories_mod.NOT_CALLABLE}]"],
                    base=BANDIT)  # fmt: skip
    with pytest.raises(UserError, match=r"bad options \{'size': 3\}"):  # an unknown option: still named so
        rewards.get("failing_factories_mod.returns_none", size=3)
