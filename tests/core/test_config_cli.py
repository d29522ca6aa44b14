"""Strict config loading and the CLI: errors are one paragraph naming the key, the file and the fix."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmgrpo.core import plugins
from mmgrpo.core.errors import UserError
from mmgrpo.train.cli import list_entries, main
from mmgrpo.train.config import Config, load_config, parse_override

GOOD = """# mmgrpo train {path}
pipeline: bandit
rewards:
  - name: bandit_arm_value
trainer:
  lr: 3e-4
  max_steps: 2
"""


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text.format(path=p))
    return p


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_good_config_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD), ["trainer.group_size=4", "loss.options.clip_high=0.28", "rewards.0.weight=2"]
    )
    assert isinstance(cfg, Config)
    assert cfg.trainer.lr == pytest.approx(3e-4)  # '3e-4' is a YAML string: converted for float fields
    assert cfg.trainer.group_size == 4 and cfg.loss.options["clip_high"] == 0.28 and cfg.rewards[0].weight == 2.0


def test_typo_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, GOOD.replace("lr: 3e-4", "lr_rate: 3e-4"))
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(e.value) == f"unknown key 'trainer.lr_rate' in {p}; did you mean 'trainer.lr'?"


def test_typo_in_override(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'trainer.grup_size' in command-line override "
                                        r"'trainer.grup_size=4'; did you mean 'trainer.group_size'\?"):  # fmt: skip
        load_config(write(tmp_path, GOOD), ["trainer.grup_size=4"])


def test_wrong_type(tmp_path):
    with pytest.raises(UserError, match=r"trainer.max_steps in .*x.yaml: expected int, got 'many' \(str\)"):
        load_config(write(tmp_path, GOOD.replace("max_steps: 2", "max_steps: many")))
    with pytest.raises(UserError, match=r"trainer.lr in command-line override 'trainer.lr=fast': expected float"):
        load_config(write(tmp_path, GOOD), ["trainer.lr=fast"])


def test_component_options_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'data.options.num_armz' .*did you mean 'data.options.num_arms'"):
        load_config(write(tmp_path, GOOD), ["data.options.num_armz=3"])
    with pytest.raises(UserError, match=r"unknown estimator 'grpo2'; known: .*did you mean 'grpo'"):
        load_config(write(tmp_path, GOOD), ["advantage.estimator=grpo2"])


def test_loss_and_advantage_options_are_checked_at_load(tmp_path):
    """Each strategy declares its options; one it does not take fails at load time, naming the key and the file."""
    cfg = load_config(write(tmp_path, GOOD), ["loss.options={clip_low: 0.2, clip_high: 0.28, dual_clip: 3}"])
    assert cfg.loss.options == {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3}
    p = write(tmp_path, GOOD)
    with pytest.raises(UserError, match=rf"'loss.options.clip_hihg' in {p}.*did you mean 'loss.options.clip_high'"):
        load_config(p, ["loss.options.clip_hihg=0.28"])
    with pytest.raises(UserError, match="unknown option 'loss.options.clip_low'.*loss 'pg' takes no options"):
        load_config(p, ["loss.name=pg", "loss.options.clip_low=0.2"])
    with pytest.raises(UserError, match="loss.options.dual_clip=0.5 must be > 1"):
        load_config(p, ["loss.options.dual_clip=0.5"])
    with pytest.raises(UserError, match="loss.name=nft .* set it"):
        load_config(p, ["loss.name=nft"])
    with pytest.raises(UserError, match="'advantage.options.unbaised'.*did you mean 'advantage.options.unbiased'"):
        load_config(p, ["advantage.options.unbaised=false"])
    load_config(p, ["advantage.estimator=stratified", "advantage.options={alpha: 0.5}"])  # keys: the trainer's
    with pytest.raises(UserError, match="'advantage.shaping_options.alpha'.*shaping 'tempsamp_soft' takes tau"):
        load_config(p, ["advantage.shaping=tempsamp_soft", "advantage.shaping_options.alpha=1"])
    with pytest.raises(UserError, match=r"loss.name in .*unknown loss 'gpso'"):
        load_config(p, ["loss.name=gpso"])


def test_loss_keys_that_moved_are_read_at_their_new_place(tmp_path):
    """Configs and run directories written before loss options nested keep loading and meaning the same."""
    p = write(tmp_path, GOOD)
    with pytest.warns(UserWarning, match="loss.clip_high in .* is read as loss.options.clip_high"):
        cfg = load_config(p, ["loss.clip_high=0.28", "loss.clip_low=0.2", "loss.dual_clip=null"])
    assert cfg.loss.options == {"clip_high": 0.28}  # old defaults (0.2, null) are the loss's own: dropped
    with pytest.warns(UserWarning, match="loss.aggregation.options.constant"):
        cfg = load_config(p, ["loss.aggregation=constant", "loss.constant=512"])
    assert (cfg.loss.aggregation.name, cfg.loss.aggregation.options) == ("constant", {"constant": 512})
    with (
        pytest.raises(UserError, match="both 'loss.clip_high' and 'loss.options.clip_high'"),
        pytest.warns(UserWarning),
    ):
        load_config(p, ["loss.clip_high=0.28", "loss.options.clip_high=0.3"])
    old_nft = "{name: nft, adv_clip: 1.0, clip_low: 0.2, clip_high: 0.2, dual_clip: null, constant: null}"
    assert load_config(p, [f"loss={old_nft}"]).loss.options == {}  # a run dir's resolved config.yaml of the demo


def test_aggregation_is_a_name_or_name_and_options(tmp_path):
    p = write(tmp_path, GOOD)
    assert load_config(p, ["loss.aggregation=seq_mean"]).loss.aggregation.name == "seq_mean"
    cfg = load_config(p, ["loss.aggregation={name: constant, options: {constant: 512}}"])
    assert cfg.loss.aggregation.options == {"constant": 512}
    with pytest.raises(UserError, match="needs loss.aggregation.options.constant > 0"):
        load_config(p, ["loss.aggregation=constant"])
    with pytest.raises(UserError, match="'loss.aggregation.options.size'.*aggregation 'token_mean' takes no options"):
        load_config(p, ["loss.aggregation.options.size=3"])
    text = GOOD + "loss:\n  aggregation: token_mean\n"
    with pytest.raises(UserError, match="loss.aggregation is 'token_mean', not a mapping"):
        load_config(write(tmp_path, text, "y.yaml"), ["loss.aggregation.options.constant=4"])


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    # YAML 1.2's numbers, not PyYAML's 1.1: a leading zero is decimal (was octal: 010 -> 8), a float needs no dot
    # (3e-1 was the string '3e-1', so config.yaml recorded text), 1:30 is text (was sexagesimal 90)
    assert [parse_override(f"a={v}")[1] for v in ("010", "0x10", "0o17", "3e-1", "1e6", "1_000", "1:30")] == [
        10, 16, 15, 0.3, 1e6, 1000, "1:30",
    ]  # fmt: skip


def test_config_yaml_reads_back_what_it_wrote(tmp_path):
    """Numbers from overrides are numbers in config.yaml, and a string that looks like a number stays a string."""
    from mmgrpo.core.config_yaml import dump_yaml, load_yaml
    from mmgrpo.train.config import dump_config

    cfg = load_config(write(tmp_path, GOOD), ["run.seed=010", "trainer.lr=3e-1", "run.name='3e-1'"])
    assert (cfg.run.seed, cfg.trainer.lr, cfg.run.name) == (10, 0.3, "3e-1")
    saved = load_yaml(dump_config(cfg))
    assert (saved["run"]["seed"], saved["trainer"]["lr"], saved["run"]["name"]) == (10, 0.3, "3e-1")
    values = {"a": "010", "b": "3e-1", "c": 1e-5, "d": "on", "e": float("inf")}
    assert load_yaml(dump_yaml(values)) == values
    with pytest.raises(UserError, match=r"got 1.234e\+59 \(float\) \(YAML reads unquoted digits.*quote the text"):
        load_config(write(tmp_path, GOOD), ["run.name=1234e56"])  # a commit-hash-like name
    with pytest.raises(UserError, match="not of the form key=value"):
        parse_override("trainer.lr")


@pytest.mark.parametrize(
    "argv_tail,expected",
    [
        (["nope.yaml"], "config file 'nope.yaml' not found"),
        (["{cfg}", "trainer.lr_rate=1"], "did you mean 'trainer.lr'?"),
        (["{cfg}", "trainer.max_steps=lots"], "expected int, got 'lots'"),
        (["{cfg}", "resume={tmp}/missing_run"], "resume directory '{tmp}/missing_run' not found"),
        # the CLI fuzz of 2026-12-06 (a directory was 'not found', an empty file 'give at least one reward')
        (["{tmp}/configs"], "config file '{tmp}/configs' is a directory; give a YAML file, e.g. {tmp}/configs/a.yaml"),
        (["{tmp}/empty.yaml"], "config file '{tmp}/empty.yaml' is empty (or only comments)"),
        (["{tmp}/comments.yaml"], "config file '{tmp}/comments.yaml' is empty (or only comments)"),
        (["{tmp}/list.yaml"], "config file '{tmp}/list.yaml' must hold a mapping at the top level, got list"),
        (["{tmp}/latin1.yaml"], "config file '{tmp}/latin1.yaml' is not UTF-8 text: line 2"),
        (["{cfg}", "trainer.max_steps"], "override 'trainer.max_steps' is not of the form key=value"),
        (["{cfg}", "=3"], "override '=3' has an empty key"),
        (["{cfg}", "foo=1"], "unknown key 'foo' in command-line override 'foo=1'; valid keys here: advantage"),
        (["{cfg}", "resume={cfg}"], "resume='{cfg}' is a file; resume takes a run directory"),
        (["{cfg}", "run.output_dir={cfg}"], "cannot create the run directory '{cfg}/"),  # a file, not a folder
        (["{cfg}", "trainer.lr_rate=1", "--debug"], None),  # --debug after the overrides, as the hint says
        (["{cfg}", "resume="], "resume='' in {cfg} is empty: give the run directory to continue"),  # not a new run
        (
            ["{cfg}", "run.name=on"],
            "expected str, got True (bool) (YAML reads an unquoted yes/no/on/off/true/false "
            "as a boolean: quote the word, in a file name: 'on', on the command line \"run.name='on'\")",
        ),
    ],
)
def test_cli_user_errors_are_one_paragraph(tmp_path, capsys, monkeypatch, argv_tail, expected):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, GOOD)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text(GOOD)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# pipeline: bandit\n")
    (tmp_path / "list.yaml").write_text("- pipeline: bandit\n")
    (tmp_path / "latin1.yaml").write_bytes(b"pipeline: bandit\n# caf\xe9\n")
    argv = ["train", *(a.format(cfg=cfg, tmp=tmp_path) for a in argv_tail)]
    if expected is None:  # --debug: the UserError itself, with its traceback
        with pytest.raises(UserError, match="did you mean 'trainer.lr'"):
            main(argv)
        return
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected.format(tmp=tmp_path, cfg=cfg) in " ".join(err.split())  # wrapped to 100 columns
    assert not (tmp_path / "runs").exists()  # nothing written
    assert err.strip().count("\n\n") == 0  # one paragraph (plus the --debug hint line)
    with pytest.raises(UserError):
        main(["--debug", *argv])


def test_resume_dir_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    code, _, err = run_cli(capsys, "train", str(write(tmp_path, GOOD)), f"resume={tmp_path}/empty_run")
    assert code == 2 and "has no complete checkpoint" in " ".join(err.split())


def test_list_shows_every_estimator_and_loss(capsys):
    entries = list_entries()
    for name in ["grpo", "dr_grpo", "batch_std", "mc_grpo", "ngrpo", "bnpo", "stratified", "mapo", "pacs"]:
        assert entries["estimators"][name], name
    for name in ["grpo", "gspo", "pg", "pacs"]:
        assert entries["losses"][name]
    for name in ["token_mean", "seq_mean", "constant"]:
        assert entries["aggregations"][name]
    assert entries["shaping"]["tempsamp_soft"]
    assert set(entries["combine"]) == {"sum_then_normalize", "normalize_then_sum", "posterior"}
    for name in ["egrpo", "strata", "dynamic_weights", "microcoder", "dagrpo"]:  # issue 17's paper methods
        assert entries["methods"][name], name
    assert "bandit" in entries["pipelines"] and "bandit" in entries["policies"]
    assert "bandit_arm_value" in entries["rewards"]
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert all(line.startswith(("  ", " ")) or line.endswith(":") or not line for line in out.splitlines())
    assert "mc_grpo" in out and "gspo" in out


def test_list_has_a_section_per_plugin_kind_including_model_families(capsys):
    """Every kind a plug-in can add (core/plugins.py BUILTIN) has its section, found by walking the registries."""
    entries = list_entries()
    assert set(plugins.BUILTIN) <= set(entries)
    assert {"sd3", "flux", "wan", "hunyuan_video", "sd"} <= set(entries["diffusion_families"])
    assert entries["pipelines"]["bandit"].startswith("categorical bandit")  # the recipe's own description
    _, out, _ = run_cli(capsys, "list")
    for kind in plugins.BUILTIN:
        assert f"[{kind}]:" in out, kind


def test_version_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "mmgrpo.train.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("mmgrpo ")


def test_train_via_cli_writes_run_dir(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", str(write(tmp_path, GOOD)), f"run.output_dir={tmp_path}/runs",
                             "trainer.progress=false")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "runs" / "run" / "metrics.jsonl").is_file()
    assert "report.html" in out


def test_shipped_configs_open_with_their_command():
    from pathlib import Path

    for p in sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")):
        first = p.read_text().splitlines()[0]
        assert first.startswith("# mmgrpo ") and p.name in first, p


@pytest.mark.parametrize(
    "config, override, new",
    [
        ("shapes_t2i_grpo", "policy.options.fm_timesteps=4", "policy.options.objective.timesteps"),
        ("shapes_t2i_grpo", "policy.options.noise_level=0.0", "policy.options.sde.noise_level"),
        ("shapes_t2i_grpo", "policy.options.window_size=4", "policy.options.exploration.size"),
        ("vlm_reasoning_tiny", "policy.options.model=x", "policy.options.path"),
        ("vlm_reasoning_tiny", "policy.options.lora_r=4", "policy.options.lora_rank"),
    ],
)
def test_an_option_of_the_old_flat_layout_says_where_it_went(config, override, new):
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(UserError, match=f"it was renamed to '{re.escape(new)}'"):
        load_config(root / "configs" / f"{config}.yaml", [override])
