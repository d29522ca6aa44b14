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
    # a list given as one word says how to write a list of one (the export walkthrough of 2026-12-07)
    with pytest.raises(UserError, match=r"expected list\[str\], got 'tensorboard' \(str\) \(a list, even of one: "
                                        r"trainer.log_with=\[tensorboard\]\)"):  # fmt: skip
        load_config(write(tmp_path, GOOD), ["trainer.log_with=tensorboard"])
    from mmgrpo.core.schema import convert

    with pytest.raises(UserError, match=r"\(a list, even of one: x.keys=\[a\]\)"):  # an optional list too
        convert("a", list[str] | None, "x.keys", "here")
    with pytest.raises(UserError) as e:  # a fixed-size pair given one number: no list hint (it is no list)
        convert(0.5, tuple[float, float], "x.sigma_range", "here")
    assert "list, even of one" not in str(e.value)


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
    with pytest.raises(UserError, match=r"'loss.options.clip_hihg' in command-line override .*did you mean 'loss.op"):
        load_config(p, ["loss.options.clip_hihg=0.28"])
    with pytest.raises(UserError, match=r"unknown option 'loss.options.clip_low'.*loss 'pg' takes no options \(clear "
                                        r"the previous one's: loss.options=\{\}\)"):  # fmt: skip
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
        (["{cfg}", "resume="], "resume='' in command-line override 'resume=' is empty: give the run directory to"),
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


SHAPES = Path(__file__).resolve().parents[2] / "configs" / "shapes_t2i_grpo.yaml"


def test_a_key_given_twice_names_the_key_both_lines_and_the_file(tmp_path):
    """PyYAML keeps the last of a repeated key silently: trainer: {lr: 1e-4, ..., lr: 0.5} trained at 0.5."""
    p = write(tmp_path, GOOD.replace("  max_steps: 2\n", "  max_steps: 2\n  lr: 5.0e-1\n"))
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(e.value).startswith(f"config file '{p}': the key 'trainer.lr' is given twice, at line 6 and at line 8")
    assert "\n  6 |   lr: 3e-4\n    |   ^\n  8 |   lr: 5.0e-1\n    |   ^" in str(e.value)
    p = write(tmp_path, GOOD.replace("  - name: bandit_arm_value\n", "  - {{name: bandit_arm_value, name: x}}\n"))
    with pytest.raises(UserError, match=r"the key 'rewards.0.name' is given twice, on line 4 \(columns 6 and 30\)"):
        load_config(p)
    with pytest.raises(UserError, match=r"command-line override 'trainer=\{lr: 1, lr: 2\}'.*'lr' is given twice"):
        load_config(write(tmp_path, GOOD), ["trainer={lr: 1, lr: 2}"])
    from mmgrpo.core.config_yaml import load_yaml

    assert load_yaml("a: {<<: {x: 1, y: 2}, x: 3}") == {"a": {"x": 3, "y": 2}}  # a merge key's value may be overridden


def test_a_yaml_syntax_error_names_the_file_line_and_column_and_shows_the_line(tmp_path):
    p = write(tmp_path, GOOD.replace("  lr: 3e-4", "  lr: [3e-4"))
    with pytest.raises(UserError) as e:
        load_config(p)
    head, *lines = str(e.value).split("\n")
    assert head.startswith(f"config file '{p}' is not valid YAML: line 7, column 12: expected ',' or ']', but got ':'")
    assert "(while parsing a flow sequence that starts at line 6, column 7)" in head
    assert lines == ["  6 |   lr: [3e-4", "    |       ^", "  7 |   max_steps: 2", "    |            ^"]
    p = write(tmp_path, GOOD.replace("name: bandit_arm_value", 'name: "bandit_arm_value'))
    with pytest.raises(UserError, match=r"is not valid YAML: at its end: found unexpected end of stream \(while "
                                        r"scanning a quoted scalar that starts at line 4, column 11\)"):  # fmt: skip
        load_config(p)
    with pytest.raises(UserError) as e:  # a list meant, not text
        load_config(write(tmp_path, GOOD), ["trainer.adam_betas=[0.9, 0.99"])
    head, *lines = str(e.value).split("\n")
    assert head.startswith("the value of command-line override 'trainer.adam_betas=[0.9, 0.99' is not valid YAML: ")
    assert lines == ["  1 | [0.9, 0.99", "    | ^         ^", "(to give that text as a string, quote it: "
                     "\"trainer.adam_betas='[0.9, 0.99'\")"]  # fmt: skip
    assert parse_override("data.options.prompt=cat: on: mat")[1] == "cat: on: mat"  # text YAML does not read: text
    # a closed bracket followed by more text is a prompt, not a broken list (it was refused)
    assert parse_override("data.options.default_prompt=[cinematic] a cat")[1] == "[cinematic] a cat"
    assert parse_override("data.options.default_prompt={} in watercolor")[1] == "{} in watercolor"


def test_the_duplicate_key_check_visits_an_aliased_node_once():
    """An anchor that holds itself recursed without end (RecursionError), and chained aliases were walked once per
    use (2**18 visits at 18 levels); a duplicate under an alias is still found."""
    from mmgrpo.core.config_yaml import DuplicateKeyError, load_yaml

    assert load_yaml("a: &x [1, *x]")["a"][0] == 1
    chain = "l0: &a0 [1, 2]\n" + "".join(f"l{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 19))
    assert len(load_yaml(chain)) == 19
    with pytest.raises(DuplicateKeyError):
        load_yaml("base: &b {lr: 1, lr: 2}\nother: *b\n")


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.options.num_step=4", "unknown key 'policy.options.num_step' in {o}; did you mean"),
        ("loss.name=grpoo", "loss.name in {o}: unknown loss 'grpoo'"),
        ("rewards.0.options.foo=1", "unknown option 'rewards.0.options.foo' in {o}: reward 'shapes' takes"),
        ("run.name=a b", "run.name 'a b' in {o} must be one plain folder name"),
    ],
)
def test_an_error_of_a_nested_override_names_the_override_not_the_file(override, message):
    with pytest.raises(UserError) as e:
        load_config(SHAPES, ["trainer.lr=3e-4", override, "trainer.max_steps=10"])
    assert message.format(o=f"command-line override '{override}'") in str(e.value)
    assert str(SHAPES) not in str(e.value)


def test_an_error_of_the_file_stays_the_files_with_overrides(tmp_path):
    p = write(tmp_path, GOOD + "loss:\n  name: grpoo\n")
    with pytest.raises(UserError, match=rf"loss.name in {re.escape(str(p))}: unknown loss 'grpoo'"):
        load_config(p, ["trainer.lr=1e-3", "policy.options.num_arms=3"])
    with pytest.raises(UserError, match=r"loss.name in command-line override 'loss.name=pgg': unknown loss 'pgg'"):
        load_config(p, ["loss.name=grpo", "loss.name=pgg"])  # the file's error fixed, another one made


def test_a_shorthand_override_keeps_the_blocks_options_for_its_own_strategy_and_drops_them_for_another():
    objective = load_config(SHAPES).policy.options["objective"]
    assert objective == {"name": "nft", "old_policy_ema": 0.5, "timesteps": 4}  # the demo's block
    assert load_config(SHAPES, ["policy.options.objective=nft"]).policy.options["objective"] == objective
    with pytest.warns(UserWarning) as caught:
        cfg = load_config(SHAPES, ["policy.options.objective=sde", "loss.name=grpo", "loss.adv_clip=null"])
    assert cfg.policy.options["objective"] == "sde"
    said = [str(w.message) for w in caught if "replaces policy.options.objective" in str(w.message)]
    assert said == [
        "command-line override 'policy.options.objective=sde' replaces policy.options.objective {name: nft, "
        "old_policy_ema: 0.5, timesteps: 4} with {name: sde}: those options belong to 'nft' and are dropped, and "
        "'sde' takes its defaults. To set options of 'sde', give them with it, e.g. "
        '"policy.options.objective={name: sde, ...}"'
    ]


@pytest.mark.parametrize(
    "override, hint",
    [
        ("trainer.learning_rate=1e-4", "did you mean 'trainer.lr'?"),
        ("learning_rate=1e-4", "did you mean 'trainer.lr'?"),
        ("trainer.num_generations=4", "did you mean 'trainer.group_size'? (samples per prompt)"),
        ("trainer.num_iterations=2", "did you mean 'trainer.epochs'? (passes over one rollout)"),
        ("trainer.num_train_epochs=2", "did you mean 'trainer.max_steps'? (a run's length counts steps"),
        ("trainer.adam_epsilon=1e-6", "did you mean 'trainer.adam_eps'?"),
        ("trainer.save_total_limit=2", "did you mean 'trainer.keep_checkpoints'?"),
        ("loss.options.epsilon_high=0.28", "did you mean 'loss.options.clip_high'?"),
        ("loss.kl_coef=0.04", "did you mean 'loss.beta'? (the weight of the KL to the reference)"),
        ("trainer.lr_rate=1", "did you mean 'trainer.lr'?"),  # the spelling match, as before
    ],
)
def test_an_unknown_key_from_another_library_suggests_mmgrpos_name(tmp_path, override, hint):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, GOOD), [override])
    assert hint in str(e.value)


def test_learning_rate_in_a_file_suggests_lr(tmp_path):
    p = write(tmp_path, GOOD.replace("lr: 3e-4", "learning_rate: 1.0e-4"))
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(e.value) == f"unknown key 'trainer.learning_rate' in {p}; did you mean 'trainer.lr'?"


def test_a_relative_path_that_exists_only_beside_the_config_says_so_at_load(tmp_path, monkeypatch):
    """Run from elsewhere, `assets/shapes_t2i` read as a hub id (five download retries, then a failure)."""
    root = SHAPES.parents[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_config(SHAPES)
    assert str(e.value) == (
        f"policy.options.path='assets/shapes_t2i' in {SHAPES} is a relative path, and relative paths in a config are "
        f"read from the working directory ({tmp_path}), where it does not exist; it exists under {root}, a folder "
        f"above the config file. Run the command from that folder (cd {root}), or give the absolute path: "
        f"policy.options.path={root}/assets/shapes_t2i"
    )
    cfg = load_config(SHAPES, [f"policy.options.path={root}/assets/shapes_t2i"])  # the fix
    assert cfg.policy.options["path"] == f"{root}/assets/shapes_t2i"
    (tmp_path / "assets" / "shapes_t2i").mkdir(parents=True)  # a folder of that name here: read from here
    assert load_config(SHAPES).policy.options["path"] == "assets/shapes_t2i"


def test_max_steps_0_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"trainer.max_steps=0 in command-line override 'trainer.max_steps=0' must "
                                        r"be >= 1 \(0 would train nothing"):  # fmt: skip
        load_config(write(tmp_path, GOOD), ["trainer.max_steps=0"])
