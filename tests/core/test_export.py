"""`mmgrpo export` round trips: each export is loaded by diffusers / peft / transformers in a process that never
imports mmgrpo, and reproduces the project's own samples within 1e-4.

- diffusion LoRA (tiny SD3, rank 2, alpha 3: the scale 1.5 must come from the file's metadata): the policy's ODE
  sample (``DiffusionPolicy.generate``, noise 0) = ``pipe.load_lora_weights(OUT)`` then ``pipe(latents=x0)``;
- diffusion full fine-tune and LoRA ``--merge``: ``DiffusionPipeline.from_pretrained(OUT)``, same comparison;
- VLM LoRA (tiny Qwen2-VL): the policy's teacher-forced log-probs of a fixed completion = those of
  ``PeftModel.from_pretrained(base, OUT)``; VLM full fine-tune and ``--merge``: ``AutoModelForImageTextToText``;
- the shipped ``assets/shapes_t2i`` loads in ``StableDiffusion3Pipeline`` and reproduces the project's sampler.

Tiny runs of 1 step are trained once per module.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from mmgrpo import rewards
from mmgrpo.core.errors import UserError
from mmgrpo.core.files import OutputNotWritten
from mmgrpo.data import shapes_qa
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmgrpo.train.cli import main as cli_main
from mmgrpo.train.config import load_config
from mmgrpo.train.export import build_policy, export_run, trained_module
from mmgrpo.train.sample import load_trained_weights
from mmgrpo.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
PROMPT, SEED, T = "a red circle", 7, 2
TOL = 1e-4


# ---------------------------------------------------------------------------------------------- helpers
def run_clean(script: str, *args: str) -> None:
    """Run ``script`` in a fresh python that must never import mmgrpo (no PYTHONPATH, checked at its end)."""
    code = script + "\nassert 'mmgrpo' not in sys.modules, [m for m in sys.modules if m.startswith('mmgrpo')]\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd="/", env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_run(root: Path, name: str, cfg: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path, [f"run.output_dir={root}", f"run.name={name}"]))
    return root / name


def policy_of(run: Path, ema: bool = False):
    policy = build_policy(load_config(run / "config.yaml"))
    load_trained_weights(trained_module(policy), latest_checkpoint(run / "checkpoints"), ema=ema)
    return policy


def ode_sample(policy: DiffusionPolicy, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial latents x0 [1, ...], image [1, 3, H, W]) of the policy's own ODE sample (``generate``)."""
    seen = {}
    rollout = policy.rollout

    def spy(*args, **kwargs):
        out = rollout(*args, **kwargs)
        seen["x0"] = out.extras["latents"][:, 0]
        return out

    policy.rollout = spy
    image = policy.generate([prompt], [seed])
    del policy.rollout
    return seen["x0"], image


DIFFUSERS_SCRIPT = """
import json, sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file
io = sys.argv[1]
case = json.loads(open(io + "/cases.json").read())
x0, out = load_file(io + "/in.safetensors")["x0"], {}
for name, model, lora in case["runs"]:
    pipe = DiffusionPipeline.from_pretrained(model)
    if lora != "-":
        pipe.load_lora_weights(lora)
    out[name] = pipe(prompt=case["prompt"], num_inference_steps=case["steps"], guidance_scale=1.0, latents=x0,
                     output_type="pt").images.contiguous()
save_file(out, io + "/out.safetensors")
"""


# ---------------------------------------------------------------------------------------------- diffusion
@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """Tiny SD3 runs of 1 step (LoRA rank 2 alpha 3, and full), exported; every export sampled by diffusers in
    one clean process from the initial latents of the policy's ODE sample. -> run dirs, exports, images."""
    root = tmp_path_factory.mktemp("sd3")
    base = save_tiny_sd3(root / "base")

    def cfg(**policy):
        return {
            "pipeline": "text_to_image",
            "policy": {"options": {"family": "sd3", "path": base, "num_steps": T, **policy}},
            "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
            "rewards": [{"name": "jpeg_incompressibility"}],
            "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "lr": 5e-2, "progress": False,
                        "ema_decay": 0.5, "export_checkpoints": True},
        }  # fmt: skip

    runs = {"lora": train_run(root, "lora", cfg(lora_rank=2, lora_alpha=3.0)), "full": train_run(root, "full", cfg())}
    exports = {
        "lora": export_run(runs["lora"], root / "out_lora"),
        "full": export_run(runs["full"], root / "out_full"),
        "merged": export_run(runs["lora"], root / "out_merged", merge=True),
    }
    x0, lora_image = ode_sample(policy_of(runs["lora"]), PROMPT, SEED)
    _, full_image = ode_sample(policy_of(runs["full"]), PROMPT, SEED)  # same seed: same x0
    expected = {"lora": lora_image, "base": lora_image, "merged": lora_image, "full": full_image}
    cases = [["lora", base, str(exports["lora"])], ["base", base, "-"]]
    cases += [[k, str(exports[k]), "-"] for k in ("full", "merged")]
    save_file({"x0": x0.contiguous()}, str(root / "in.safetensors"))
    (root / "cases.json").write_text(json.dumps({"runs": cases, "prompt": PROMPT, "steps": T}))
    run_clean(DIFFUSERS_SCRIPT, str(root))
    got = load_file(str(root / "out.safetensors"))
    diffs = {k: (got[k] - expected[k]).abs().max().item() for k in got}
    print("\ndiffusion round trips, max |diffusers - policy|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    return runs, exports, diffs


def test_diffusion_lora_loads_in_diffusers_and_reproduces_the_policy(sd3):
    runs, exports, diffs = sd3
    assert sorted(p.name for p in exports["lora"].iterdir()) == [
        "mmgrpo_export.json",
        "pytorch_lora_weights.safetensors",
    ]
    assert diffs["lora"] < TOL
    assert diffs["base"] > 100 * TOL  # without the LoRA (or with the wrong scale) the sample differs
    # the trainer's export/ beside the checkpoint (trainer.export_checkpoints) holds the same adapter
    beside = latest_checkpoint(runs["lora"] / "checkpoints") / "export" / "pytorch_lora_weights.safetensors"
    a, b = load_file(str(beside)), load_file(str(exports["lora"] / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", ["full", "merged"])
def test_diffusion_pipeline_folder_reproduces_the_policy(sd3, which):
    _, exports, diffs = sd3
    out = exports[which]
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    assert not any("lora" in k for k in load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")))
    assert diffs[which] < TOL


def test_ema_export_holds_the_ema_weights(sd3, tmp_path, monkeypatch):
    import mmgrpo.train.checkpoint as checkpoint

    run = sd3[0]["lora"]
    hashed, digest = [], checkpoint._digest
    monkeypatch.setattr(checkpoint, "_digest", lambda f: hashed.append(f.name) or digest(f))
    out = export_run(run, tmp_path / "ema", ema=True)
    assert sorted(hashed) == ["state.json", "tensors.safetensors"]  # the checkpoint's files are hashed once
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    shadow = dict(zip(state["model"], state["ema"]["shadow"]))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(shadow)
    for name, w in shadow.items():
        assert torch.equal(saved["transformer." + name.replace(".default.", ".")], w)
    assert json.loads((out / "mmgrpo_export.json").read_text())["ema"] is True


def test_merge_of_a_full_fine_tune_writes_the_full_folder_and_says_nothing_was_merged(sd3, tmp_path, capsys):
    # one command exports every run as a complete model (the KDRL benchmark's teacher export relies on it)
    runs = sd3[0]
    assert cli_main(["export", str(runs["full"]), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert "nothing was merged (mmgrpo_export.json: merged false)" in " ".join(capsys.readouterr().out.split())
    assert json.loads((tmp_path / "m" / "mmgrpo_export.json").read_text())["merged"] is False
    assert cli_main(["export", str(runs["full"]), "--out", str(tmp_path / "plain")]) == 0
    assert sorted(p.relative_to(tmp_path / "m") for p in (tmp_path / "m").rglob("*") if p.is_file()) == sorted(
        p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file()
    )


def test_export_errors_are_user_errors(sd3, tmp_path, capsys):
    run = sd3[0]["lora"]
    with pytest.raises(UserError, match="no checkpoint of step 5 .*kept: 1"):
        export_run(run, tmp_path / "x", step=5)
    with pytest.raises(UserError, match=r"step='one': a checkpoint's step is a whole number"):
        export_run(run, tmp_path / "x", step="one")
    # a step given as text (a script's own argument) was "no checkpoint of step 1 (checkpoints kept: 1)"
    assert (export_run(run, tmp_path / "s", step="1") / "mmgrpo_export.json").is_file()
    with pytest.raises(UserError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(UserError, match="not empty"):
        export_run(run, tmp_path / "full")
    bandit = tmp_path / "bandit"
    overrides = [f"run.output_dir={tmp_path}", "run.name=bandit", "trainer.max_steps=1", "trainer.progress=false"]
    train(load_config(REPO / "configs" / "bandit.yaml", overrides))
    with pytest.raises(UserError, match="'bandit' recipe cannot be exported"):
        export_run(bandit, tmp_path / "b")
    assert cli_main(["export", str(run), "--step", "5", "--out", str(tmp_path / "y")]) == 2
    assert "no checkpoint of step 5" in capsys.readouterr().err
    assert cli_main(["export", str(run), "--step", "1", "--out", str(tmp_path / "z")]) == 0
    assert (tmp_path / "z" / "pytorch_lora_weights.safetensors").is_file()


def test_a_damaged_newest_checkpoint_is_skipped_with_a_note(sd3, tmp_path, capsys):
    """The walkthrough flipped a byte of the newest checkpoint's tensors: export wrote the one before with no word,
    while mmgrpo sample --run printed a note. Now export says it too."""
    run = tmp_path / "run"
    shutil.copytree(sd3[0]["lora"], run)
    newest = run / "checkpoints" / "step_000002"
    shutil.copytree(run / "checkpoints" / "step_000001", newest)
    with open(newest / "tensors.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"note: skipped a damaged checkpoint: {newest}" in err and "tensors.safetensors" in err
    assert f"; exporting {run / 'checkpoints' / 'step_000001'}" in err
    assert json.loads((tmp_path / "out" / "mmgrpo_export.json").read_text())["checkpoint"] == "step_000001"


@pytest.mark.parametrize(
    "argv,expected",
    [  # the CLI fuzz of 2026-12-06: each was a traceback, an export into the run directory, or silently accepted
        (["{lora}", "--out", "{tmp}/file"], "--out '{tmp}/file' is a file, not a folder"),
        (["{lora}", "--out", "{tmp}/file/sub"], "'{tmp}/file' is a file, so no folder can be made there"),
        (["{lora}", "--out", "{tmp}/full"], "--out folder '{tmp}/full' exists and is not empty"),
        (["{lora}", "--out", "{lora}"], "--out folder '{lora}' exists and is not empty"),
        (["{lora}", "--out", "{lora}/export"], "--out '{lora}/export' is inside the run directory '{lora}'"),
        (["{lora}", "--out", "{lora}/checkpoints/step_000001/mine"], "is inside the run directory '{lora}'"),
        (["{lora}", "--step", "-1", "--out", "{tmp}/new"], "--step -1: a checkpoint step is >= 0"),
        (["{full}", "--ema", "--out", "{tmp}/new"], "no EMA weights"),
        (["{damaged}", "--out", "{tmp}/new"], "has no complete checkpoint under checkpoints/"),
        (["{damaged}", "--step", "1", "--out", "{tmp}/new"], "checkpoint of step 1 cannot be exported, it is damaged"),
        # the new-user walkthrough of 2026-12-07: the tracebacks of mkdir once the model had loaded
        (["{lora}", "--out", "/proc/x"], "--out '/proc/x' could not be written (no folder can be made in '/proc': No"),
        (["{lora}", "--out", "/sys/kernel/x"], "--out '/sys/kernel/x' could not be written (no folder can be made in"),
        (["{lora}", "--out", "{tmp}/link"], "--out '{tmp}/link' is a symbolic link (to the folder '{tmp}/empty')"),
        (["{lora}", "--out", ""], "--out is empty; give a folder path"),
    ],
)
def test_export_cli_refuses_bad_flags_and_writes_nothing(sd3, tmp_path, capsys, argv, expected):
    runs = sd3[0]
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["lora"], damaged)
    with open(damaged / "checkpoints" / "step_000001" / "tensors.safetensors", "r+b") as f:
        f.truncate(1000)
    full = tmp_path / "full_no_ema"  # the full run's checkpoint without its EMA shadow
    shutil.copytree(runs["full"], full)
    ckpt = full / "checkpoints" / "step_000001"
    state = load_checkpoint(ckpt)
    shutil.rmtree(ckpt)
    save_checkpoint(full / "checkpoints", 1, {**state, "ema": None})
    fmt = dict(tmp=tmp_path, lora=runs["lora"], full=full, damaged=damaged)
    before = {k: sorted(p.relative_to(v) for p in v.rglob("*")) for k, v in fmt.items() if k != "tmp"}
    assert cli_main(["export", *(a.format(**fmt) for a in argv)]) == 2
    err = capsys.readouterr().err
    err = err[err.index("error: ") :]  # after the model's loading bar (--merge, --ema: refused once it is built)
    assert "Traceback" not in err and expected.format(**fmt) in " ".join(err.split())
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "file").read_text() == "mine" and os.listdir(tmp_path / "full") == ["mine"]
    assert os.listdir(tmp_path / "empty") == [] and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert {k: sorted(p.relative_to(v) for p in v.rglob("*")) for k, v in fmt.items() if k != "tmp"} == before


def test_a_failed_export_leaves_no_folder(sd3, tmp_path, monkeypatch):
    def half_written(policy, out, merge, inplace):
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mmgrpo.train.export.export_diffusion", half_written)
    with pytest.raises(OutputNotWritten, match=r"written \(\[Errno 28\] No space left on device\); nothing"):
        export_run(sd3[0]["lora"], tmp_path / "a" / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_diffusion_lora_export_given_as_a_model_names_its_base(sd3, tmp_path, capsys):
    """The walkthrough gave a LoRA export as the model (policy.options.path=, mmgrpo sample --model): "has no
    transformer/ folder; is it an SD3-layout checkpoint?". Now: it is a LoRA adapter of base X, not a model."""
    runs, exports, _ = sd3
    lora = exports["lora"]
    base = json.loads((lora / "mmgrpo_export.json").read_text())["base"]
    run = runs["lora"].resolve()
    expected = (f"policy.options.path='{lora}' is a LoRA adapter (diffusers format, of base {base}), not a model: "
                f"give the base model as policy.options.path ({base}), onto which the adapter loads outside mmgrpo "
                f"with pipe.load_lora_weights('{lora}') on the base pipeline; to train from the adapter, give it as "
                f"policy.options.init_lora='{lora}' (merged into the base as it loads); or export a full model folder "
                f"with the adapter merged in (mmgrpo export {run} --merge --out DIR) and give that")  # fmt: skip
    with pytest.raises(UserError) as info:
        load_adapter(GeneratorPolicyOptions(family="sd3", path=str(lora), num_steps=T))
    assert str(info.value) == expected
    argv = ["sample", "--model", str(lora), "--family", "sd3", "--prompts", "a red circle"]
    argv += ["--best-of", "2", "--reward", "jpeg_incompressibility", "--out", str(tmp_path / "s")]
    assert cli_main(argv) == 2
    assert f"policy.options.path='{lora}' is a LoRA adapter (diffusers format, of base {base})" in " ".join(
        capsys.readouterr().err.split()
    )
    assert not (tmp_path / "s").exists()


def test_a_vlm_lora_export_given_as_a_model_names_its_base(vlm, tmp_path):
    """The VLM side said transformers' "Unrecognized model ... Should have a `model_type` key in its config.json..".
    A peft adapter folder that mmgrpo did not write names the base its adapter_config.json records."""
    lora = vlm[0]["lora"]
    base = json.loads((lora / "mmgrpo_export.json").read_text())["base"]
    with pytest.raises(UserError, match=r"is a LoRA adapter \(peft format, of base .*\), not a model") as info:
        VLMPolicy.from_pretrained(str(lora), VLMPolicyOptions(lora_rank=2))
    message = " ".join(str(info.value).split())
    assert message.startswith(f"policy.options.path='{lora}' is a LoRA adapter (peft format, of base {base})")
    assert f"peft.PeftModel.from_pretrained(base_model, '{lora}')" in message and "--merge" in message
    plain = tmp_path / "adapter"  # peft's own save_pretrained: no mmgrpo_export.json
    shutil.copytree(lora, plain, ignore=shutil.ignore_patterns("mmgrpo_export.json"))
    recorded = json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(UserError, match=rf"is a LoRA adapter \(peft format, of base {recorded}\)"):
        VLMPolicy.from_pretrained(str(plain), VLMPolicyOptions(lora_rank=2))


def test_a_lora_given_as_a_hub_id_is_named_as_a_lora_from_the_cache(sd3, vlm, tmp_path):
    """The same refusal for a LoRA repository given as a hub id, read from the hub cache offline (it was the loaders'
    layout errors, as a local folder's were): the message names the hub id, not the cache's snapshot folder."""
    from mmgrpo.testing.hub import add_snapshot, offline_hub

    with offline_hub(tmp_path / "hub") as cache:
        add_snapshot(cache, "mmgrpo-test/sd3-lora", sd3[1]["lora"])
        add_snapshot(cache, "mmgrpo-test/vlm-lora", vlm[0]["lora"])
        with pytest.raises(UserError) as info:
            load_adapter(GeneratorPolicyOptions(family="sd3", path="mmgrpo-test/sd3-lora", num_steps=T))
        message = str(info.value)
        assert message.startswith("policy.options.path='mmgrpo-test/sd3-lora' is a LoRA adapter (diffusers format")
        assert "pipe.load_lora_weights('mmgrpo-test/sd3-lora')" in message and str(cache) not in message
        with pytest.raises(UserError, match=r"path='mmgrpo-test/vlm-lora' is a LoRA adapter \(peft format, of base"):
            VLMPolicy.from_pretrained("mmgrpo-test/vlm-lora", VLMPolicyOptions(lora_rank=2))


def test_a_failed_export_beside_a_checkpoint_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    """trainer.export_checkpoints onto a disk that fills up during the export (safetensors' SafetensorError, after a
    good checkpoint was written): the walkthrough's run crashed with a traceback and no resume= line. Now the
    checkpoint stands, a warning names the export and why, the next step's checkpoint and export are written."""
    from safetensors import SafetensorError

    from mmgrpo.train import export

    real, calls = export.export_diffusion, []

    def disk_full_once(policy, out, merge, inplace):
        calls.append(out)
        if len(calls) > 1:
            return real(policy, out, merge, inplace)
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "export_diffusion", disk_full_once)
    base = save_tiny_sd3(tmp_path / "base")
    cfg = {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3", "path": base, "num_steps": T, "lora_rank": 2}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"max_steps": 2, "checkpoint_every": 1, "prompts_per_step": 1, "group_size": 2, "progress": False,
                    "export_checkpoints": True},
    }  # fmt: skip
    with pytest.warns(UserWarning) as seen:
        run = train_run(tmp_path, "run", cfg)
    said = [" ".join(str(w.message).split()) for w in seen if "export beside" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in seen]
    assert said[0].startswith(f"step 1: the export beside checkpoint {run / 'checkpoints' / 'step_000001'}")
    assert "(Error while serializing: I/O error: No space left on device (os error 28))" in said[0]
    assert f"training goes on. Free disk space, then write the export with `mmgrpo export {run} --step 1" in said[0]
    first, second = run / "checkpoints" / "step_000001", run / "checkpoints" / "step_000002"
    assert sorted(p.name for p in first.iterdir()) == ["COMPLETE", "state.json", "tensors.safetensors"]  # no .tmp
    assert (second / "export" / "pytorch_lora_weights.safetensors").is_file()
    load_checkpoint(first)  # the checkpoint stands (verified)


FULL_DISK_SCRIPT = """
import resource, sys
from mmgrpo.train.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))  # python ignores SIGXFSZ
sys.exit(main(["export", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("which", ["lora", "full"])
def test_an_export_onto_a_full_disk_is_one_paragraph_and_exit_2(sd3, tmp_path, which):
    """The walkthrough's full disk (safetensors' SafetensorError, copytree's shutil.Error): a file-size limit on
    the exporting process makes the same refusals (errno 27 for 28); nothing is left beside --out."""
    out = tmp_path / "out"
    argv = ["1000", str(sd3[0][which]), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, *argv], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    err = " ".join(proc.stderr[proc.stderr.index("error: ") :].split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--out '{out}' could not be written (" in err and "File too large" in err
    assert "writable disk with free space" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- shapes asset
SHAPES_SCRIPT = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
path, io, prompt, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# --- the README's snippet: a plain SD3 pipeline without T5 (the model was trained with no T5 tokens)
pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
images = pipe(prompt, max_sequence_length=0, guidance_scale=1.0, num_inference_steps=steps,
              latents=load_file(io + "/in.safetensors")["x0"], output_type="pt").images
save_file({"image": images.contiguous()}, io + "/out.safetensors")
"""


def test_shipped_shapes_model_is_a_diffusers_pipeline(tmp_path):
    path = str(REPO / "assets" / "shapes_t2i")
    opts = GeneratorPolicyOptions(family="sd3", path=path, num_steps=10)
    x0, image = ode_sample(DiffusionPolicy(load_adapter(opts), opts), "two blue squares", 3)
    save_file({"x0": x0.contiguous()}, str(tmp_path / "in.safetensors"))
    run_clean(SHAPES_SCRIPT, path, str(tmp_path), "two blue squares", "10")
    got = load_file(str(tmp_path / "out.safetensors"))["image"]
    diff = (got - image).abs().max().item()
    print(f"shapes_t2i: max |diffusers - policy| = {diff:.2e}")
    assert got.shape == image.shape == (1, 3, 32, 32) and diff < TOL


BARE_SCRIPT = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
path, io, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = StableDiffusion3Pipeline.from_pretrained(path)  # no arguments: every component from model_index.json
images = pipe(prompt, latents=load_file(io + "/in.safetensors")["x0"], output_type="pt").images  # diffusers' defaults
save_file({"image": images.contiguous()}, io + "/out.safetensors")
"""


def test_shipped_shapes_model_with_every_diffusers_default_is_the_sampler_at_those_settings(tmp_path):
    """The issue's literal call, ``StableDiffusion3Pipeline.from_pretrained("assets/shapes_t2i")(prompt)``: it loads
    with no arguments and runs diffusers' defaults (28 steps, guidance 7, 256 zero T5 tokens, empty negative prompt);
    the project's sampler set to the same (num_steps 28, guidance_scale 7, adapter max_sequence_length 256) gives the
    same image. The model was trained with no T5 tokens, so these are not the images it learned to draw: those take
    ``max_sequence_length=0, guidance_scale=1.0`` (the README's snippet, the test above)."""
    path = str(REPO / "assets" / "shapes_t2i")
    opts = GeneratorPolicyOptions(family="sd3", path=path, num_steps=28, guidance_scale=7.0,
                                  adapter_options={"max_sequence_length": 256})  # fmt: skip
    x0, image = ode_sample(DiffusionPolicy(load_adapter(opts), opts), "a red circle", 5)
    save_file({"x0": x0.contiguous()}, str(tmp_path / "in.safetensors"))
    run_clean(BARE_SCRIPT, path, str(tmp_path), "a red circle")
    got = load_file(str(tmp_path / "out.safetensors"))["image"]
    diff = (got - image).abs().max().item()
    print(f"shapes_t2i with diffusers' defaults: max |diffusers - policy| = {diff:.2e}")
    # guidance 7 multiplies the float32 rounding of the two branches' difference by 7 at each of 28 steps, over 272
    # tokens (measured: exactly 0 at guidance 1 and 256 T5 tokens; 4e-6 at guidance 7 with 16 T5 tokens; 2.5e-5 to
    # 1.3e-4 at diffusers' defaults, depending on the thread count): a real difference would be of order 1e-2
    assert got.shape == image.shape == (1, 3, 32, 32) and diff < 1e-3


# ---------------------------------------------------------------------------------------------- VLM
VLM_SCRIPT = """
import json, sys, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
io = sys.argv[1]
case = json.loads(open(io + "/case.json").read())
comp, out = torch.tensor(case["completion"]), {}
for name, model_dir, adapter in case["runs"]:
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter != "-":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    processor = AutoProcessor.from_pretrained(adapter if adapter != "-" else model_dir)
    text = processor.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.open(io + "/image.png")], return_tensors="pt")
    ids = torch.cat([enc["input_ids"][0], comp])[None]
    extra = {}
    if "mm_token_type_ids" in enc:  # the completion's tokens are text (type 0)
        extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(comp)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"], **extra).logits[0].float()
    lp = enc["input_ids"].shape[1]
    logits = logits[lp - 1 : lp - 1 + len(comp)] / case["temperature"]
    logits[:, case["suppress"]] = float("-inf")
    out[name] = logits.log_softmax(-1).gather(-1, comp[:, None])[:, 0].contiguous()
    out[name + "/prompt_ids"] = enc["input_ids"][0].contiguous()
save_file(out, io + "/out.safetensors")
"""


@rewards.register("test_export_text_checksum")
def text_checksum():
    """A reward that differs between (almost) any two completions, so that every group has an advantage."""

    def fn(samples, prompts, meta, ctx):
        return [float(sum(map(ord, text)) % 97) for text in samples]

    return fn


def vlm_case(policy, question: dict, image: np.ndarray) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(the case for the clean process, the policy's prompt ids, its log-probs of a fixed completion)."""
    prompt = policy.prepare(question, {"image": image})
    completion = policy.tokenizer("<think> two </think> <answer> B </answer>").input_ids + [policy.eos_ids[0]]
    scorer = policy._scorer()
    case = {
        "messages": policy.messages(question, 1, False),
        "completion": completion,
        "suppress": scorer.suppress.nonzero()[:, 0].tolist(),
        "temperature": scorer.temperature,  # the policy's log-probs are of logits / temperature
    }
    with torch.no_grad():
        logp, _ = scorer([prompt], torch.tensor([completion]))
    return case, prompt.input_ids, logp[0]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """Tiny Qwen2-VL runs of 1 step (LoRA rank 2 alpha 6, and full), exported; every export scored in one clean
    process (peft / transformers) on a fixed prompt + image + completion. -> exports, max log-prob differences."""
    root = tmp_path_factory.mktemp("vlm")
    asset = str(REPO / "assets" / "tiny_qwen2_vl")
    common = [
        f"policy.options.path={asset}", "policy.options.max_new_tokens=4",
        "policy.options.temperature=8.0",  # the asset answers in one format: diverse rows make an advantage
        "data.options.num_examples=8", "data.options.eval_examples=2", "trainer.max_steps=1",
        "trainer.prompts_per_step=1", "trainer.group_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
        "trainer.progress=false", "trainer.lr=5e-2", f"run.output_dir={root}",
    ]  # fmt: skip
    config = root / "vlm.yaml"
    cfg = yaml.safe_load((REPO / "configs" / "vlm_reasoning_tiny.yaml").read_text())
    config.write_text(yaml.safe_dump({**cfg, "rewards": [{"name": "test_export_text_checksum"}]}))
    lora = ["run.name=lora", "policy.options.lora_rank=2", "policy.options.lora_alpha=6"]
    train(load_config(config, [*common, *lora]))
    train(load_config(config, [*common, "run.name=full", "policy.options.finetune=full"]))
    runs = {"lora": root / "lora", "full": root / "full"}
    exports = {
        "lora": export_run(runs["lora"], root / "out_lora"),
        "full": export_run(runs["full"], root / "out_full"),
        "merged": export_run(runs["lora"], root / "out_merged", merge=True),
    }
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "image.png")
    question = {"question": "How many red circles are there?", "options": ["1", "2", "3"]}
    case, ids, lora_logp = vlm_case(policy_of(runs["lora"]), question, image)
    _, _, full_logp = vlm_case(policy_of(runs["full"]), question, image)
    expected = {"lora": lora_logp, "base": lora_logp, "merged": lora_logp, "full": full_logp}
    case["runs"] = [["lora", asset, str(exports["lora"])], ["base", asset, "-"]]
    case["runs"] += [[k, str(exports[k]), "-"] for k in ("full", "merged")]
    (root / "case.json").write_text(json.dumps(case))
    run_clean(VLM_SCRIPT, str(root))
    got = load_file(str(root / "out.safetensors"))
    for k in expected:  # the exported processor renders the prompt (chat template, image tokens) as the policy did
        assert torch.equal(got[k + "/prompt_ids"], ids.cpu()), k
    diffs = {k: (got[k] - expected[k]).abs().max().item() for k in expected}
    print("\nVLM round trips, max |log-prob - policy's|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    return exports, diffs


def test_vlm_lora_loads_as_a_peft_adapter_and_reproduces_the_policy(vlm):
    exports, diffs = vlm
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in exports["lora"].iterdir()}
    assert diffs["lora"] < TOL
    assert diffs["base"] > 100 * TOL  # without the adapter (or with the wrong alpha / r) the log-probs differ


@pytest.mark.parametrize("which", ["full", "merged"])
def test_vlm_transformers_folder_reproduces_the_policy(vlm, which):
    exports, diffs = vlm
    names = {p.name for p in exports[which].iterdir()}
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= names and "adapter_config.json" not in names
    assert diffs[which] < TOL


SETTINGS_SCRIPT = """
import json, os, sys
from transformers import GenerationConfig
out = {}
for folder in sys.argv[1:]:
    info = json.load(open(os.path.join(folder, "mmgrpo_export.json")))
    has_gen = os.path.isfile(os.path.join(folder, "generation_config.json"))
    gen = GenerationConfig.from_pretrained(folder).to_dict() if has_gen else None
    keys = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")
    out[os.path.basename(folder)] = {"info": info, "gen": gen and {k: gen.get(k) for k in keys}}
print(json.dumps(out))
"""


def test_a_vlm_export_records_the_system_prompt_and_sampling_it_was_trained_with(vlm):
    """The walkthrough's VLM export dropped policy.options.system_prompt (the R1 prompt: the chat template does not
    hold it) and the sampling settings. mmgrpo_export.json records them, and a transformers folder's
    generation_config.json samples as training did; both read by transformers in `python -I` without mmgrpo."""
    from mmgrpo.policies.vlm_inputs import R1_SYSTEM_PROMPT

    exports = vlm[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    folders = [str(exports[k]) for k in ("lora", "full", "merged")]
    code = SETTINGS_SCRIPT + "assert 'mmgrpo' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-I", "-c", code, *folders], capture_output=True, text=True, cwd="/",
                          env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    trained = {"system_prompt": R1_SYSTEM_PROMPT, "temperature": 8.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4}
    for name in ("out_lora", "out_full", "out_merged"):
        assert {k: got[name]["info"].get(k) for k in trained} == trained, name
    assert got["out_lora"]["gen"] is None  # a peft adapter folder has no generation config
    for name in ("out_full", "out_merged"):
        assert got[name]["gen"] == {"do_sample": True, **{k: v for k, v in trained.items() if k != "system_prompt"}}


SHAPES_VLM_SCRIPT = """
import json, sys, torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor
path, io = sys.argv[1], sys.argv[2]
case = json.loads(open(io + "/case.json").read())
model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(path)
out = {}
for i, messages in enumerate(case["messages"]):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.open(f"{io}/image{i}.png")], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=case["max_new_tokens"],
                             suppress_tokens=case["suppress"], eos_token_id=case["eos"])
    out[f"{i}/prompt_ids"] = enc["input_ids"][0].contiguous()
    out[f"{i}/completion"] = ids[0, enc["input_ids"].shape[1]:].contiguous()
save_file(out, io + "/out.safetensors")
"""


def test_shipped_shapes_vlm_is_a_transformers_model_that_answers_as_the_policy(tmp_path):
    """assets/shapes_vlm in plain transformers (AutoModelForImageTextToText + AutoProcessor, greedy ``generate``)
    renders the same prompt and writes the same answer tokens as the project's greedy decoding."""
    path = str(REPO / "assets" / "shapes_vlm")
    policy = VLMPolicy.from_pretrained(path, VLMPolicyOptions(finetune="full", system_prompt="", max_new_tokens=24))
    exs = [shapes_qa.make_example(s, k) for s, k in zip(shapes_qa.heldout_seeds(3), shapes_qa.QA_KINDS)]
    case = {"messages": [], "max_new_tokens": 24, "eos": list(policy.eos_ids)}
    case["suppress"] = policy._scorer().suppress.nonzero()[:, 0].tolist()
    expected = []
    for i, e in enumerate(exs):
        Image.fromarray(e.image).save(tmp_path / f"image{i}.png")
        prompt = policy.prepare(e.prompt(), e.meta())
        toks, lens, _, _ = policy.sample(prompt, 1, None, greedy=True)
        expected.append((prompt.input_ids.cpu(), toks[0, : int(lens[0])].cpu()))
        case["messages"].append(policy.messages(e.prompt(), 1, False))
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_clean(SHAPES_VLM_SCRIPT, path, str(tmp_path))
    got = load_file(str(tmp_path / "out.safetensors"))
    for i, (ids, completion) in enumerate(expected):
        assert torch.equal(got[f"{i}/prompt_ids"], ids), i
        assert completion.numel() > 3 and torch.equal(got[f"{i}/completion"], completion), (
            i,
            policy._decode(completion),
        )


def test_a_run_trained_with_xformers_exports_on_a_machine_without_it(sd3, tmp_path):
    """xformers needs a CUDA GPU (training refuses it elsewhere); a run trained with it is exported or sampled on a
    CPU machine with sdpa and a warning: the weights do not depend on the attention kernel."""
    run = sd3[0]["lora"]
    cfg = load_config(run / "config.yaml", ["policy.options.attention=xformers"])
    with pytest.warns(UserWarning, match="attention=xformers cannot run on cpu here; mmgrpo export uses sdpa"):
        policy = build_policy(cfg)
    assert policy.opts.attention == "sdpa"


# ---------------------------------------------------------------------------------------------- init_lora
def sd3_from_lora_cfg(base: str, lora: str) -> dict:
    return {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3", "path": base, "num_steps": T, "lora_rank": 2, "init_lora": lora}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "lr": 5e-2, "progress": False},
    }


def test_a_diffusion_run_starts_from_a_lora_and_exports_it_merged(sd3, tmp_path):
    """policy.options.init_lora: there was no way to start from a LoRA (an SFT adapter, an earlier run's export); the
    path refused it as "a LoRA adapter, not a model". Now it is fused into the denoiser as it loads, so the policy
    samples what the LoRA run's own policy (and diffusers with the LoRA loaded) sampled; the run's export is a full
    pipeline folder (its adapter applies on top of the merge), which diffusers samples as the policy does."""
    runs, exports, _ = sd3
    lora = exports["lora"]
    base = json.loads((lora / "mmgrpo_export.json").read_text())["base"]
    _, lora_image = ode_sample(policy_of(runs["lora"]), PROMPT, SEED)
    _, base_image = ode_sample(build_policy(load_config(runs["lora"] / "config.yaml")), PROMPT, SEED)
    opts = GeneratorPolicyOptions(family="sd3", path=base, num_steps=T, lora_rank=2, init_lora=str(lora))
    started = DiffusionPolicy(load_adapter(opts), opts)
    _, image = ode_sample(started, PROMPT, SEED)
    assert (image - lora_image).abs().max() < TOL < (base_image - lora_image).abs().max()
    names = [n for n, p in started.adapter.denoiser.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and ".default." in n for n in names)  # only the new adapter trains
    assert not any("mmgrpo_init" in n for n, _ in started.adapter.denoiser.named_parameters())

    start = tmp_path / "start"  # the run's own copy of the adapter: changed below
    shutil.copytree(lora, start)
    cfg = sd3_from_lora_cfg(base, str(start))
    cfg["trainer"]["export_checkpoints"] = True  # said once, as training starts: each export is a full folder
    with pytest.warns(UserWarning, match=r"export_checkpoints with policy.options.init_lora: .* full model folder"):
        run = train_run(tmp_path, "from_lora", cfg)
    beside = latest_checkpoint(run / "checkpoints") / "export"
    assert json.loads((beside / "mmgrpo_export.json").read_text())["format"] == "diffusers_pipeline"
    with pytest.warns(UserWarning, match=r"started from the LoRA .* full model folder"):
        out = export_run(run, tmp_path / "out")
    record = json.loads((out / "mmgrpo_export.json").read_text())
    assert record["format"] == "diffusers_pipeline" and record["merged"] is True
    assert record["init_lora"] == str(start.resolve())
    weights = start / "pytorch_lora_weights.safetensors"
    pinned = yaml.safe_load((run / "config.yaml").read_text())["policy"]["options"]["init_lora_sha256"]
    assert pinned == hashlib.sha256(weights.read_bytes()).hexdigest()
    x0, trained = ode_sample(policy_of(run), PROMPT, SEED)
    assert (trained - image).abs().max() > 100 * TOL  # the step trained the new adapter
    save_file({"x0": x0.contiguous()}, str(tmp_path / "in.safetensors"))
    (tmp_path / "cases.json").write_text(json.dumps({"runs": [["init", str(out), "-"]], "prompt": PROMPT, "steps": T}))
    run_clean(DIFFUSERS_SCRIPT, str(tmp_path))
    assert (load_file(str(tmp_path / "out.safetensors"))["init"] - trained).abs().max() < TOL
    # the adapter file changed after the run began (retrained in place): export and resume refuse it, naming it
    weights.write_bytes(weights.read_bytes()[:-4] + b"    ")
    with pytest.raises(UserError, match=r"init_lora='.*start': its weights file .* changed since the run began"):
        export_run(run, tmp_path / "out2")
    with pytest.raises(UserError, match=r"init_lora='.*start': its weights file .* changed since the run began"):
        train(load_config(run / "config.yaml", [f"resume={run}", "trainer.max_steps=2"]))  # as the run says to


def test_init_lora_that_does_not_fit_is_one_paragraph(sd3, vlm, tmp_path):
    from mmgrpo.testing.hub import add_snapshot, offline_hub

    lora = sd3[1]["lora"]
    base = json.loads((lora / "mmgrpo_export.json").read_text())["base"]

    def load(init: str, path: str = base):
        opts = GeneratorPolicyOptions(family="sd3", path=path, num_steps=T, lora_rank=2, init_lora=init)
        return load_adapter(opts)

    with pytest.raises(UserError, match=r"init_lora='.*' is not a diffusers LoRA: it needs pytorch_lora_weights"):
        load(str(vlm[0]["lora"]))  # a peft adapter (a VLM's) where a diffusers LoRA goes
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"the folder holds \['pytorch_lora_weights.bin'\]. A pickled adapter"):
        load(str(pickled))
    with pytest.raises(UserError, match=r"init_lora='.*' does not load onto the transformer of .*shapes_t2i: ") as e:
        with pytest.warns(UserWarning, match=r"records its base model as '.*/base', but the run's model is .*shapes"):
            load(str(lora), str(REPO / "assets" / "shapes_t2i"))  # another SD3's adapter: other shapes
    assert str(e.value).endswith("The adapter must be made for this base model") and len(str(e.value)) < 1500
    same_shapes = tmp_path / "another_model"  # a model of the same shapes: the merge works, the names differ
    shutil.copytree(base, same_shapes)
    with pytest.warns(UserWarning, match=r"records its base model as .*, but the run's model is .*another_model"):
        load(str(lora), str(same_shapes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(str(lora))  # its own base: nothing said
    torn = tmp_path / "torn"  # a LoRA file cut short (a copy that stopped): one paragraph, not safetensors' error
    torn.mkdir()
    (torn / "pytorch_lora_weights.safetensors").write_bytes(
        (lora / "pytorch_lora_weights.safetensors").read_bytes()[:80]
    )
    with pytest.raises(UserError, match=r"init_lora='.*torn' does not load onto the transformer of"):
        load(str(torn))
    uncached = r"init_lora='nobody/none' is not a local folder.*, so it is read as a hub.*`hf download nobody/none"
    with pytest.raises(UserError, match=uncached):
        with offline_hub(tmp_path / "empty_hub"):
            load("nobody/none")
    with offline_hub(tmp_path / "hub") as cache:  # a hub id, read from the cache offline: the same merge
        add_snapshot(cache, "mmgrpo-test/sd3-lora", lora)
        by_id, by_folder = load("mmgrpo-test/sd3-lora").denoiser, load(str(lora)).denoiser
    a, b = by_id.state_dict(), by_folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"init_lora='.*' is not a peft LoRA adapter: it needs adapter_config.json"):
        VLMPolicy.from_pretrained(str(REPO / "assets" / "tiny_qwen2_vl"), VLMPolicyOptions(init_lora=str(lora)))


def test_a_vlm_run_starts_from_a_peft_lora_and_exports_it_merged(vlm, tmp_path):
    """The VLM side of init_lora (an SFT adapter of TRL or peft, here an earlier run's export): merged as the model
    loads, so the new policy scores as the adapter's own run did and its KL reference (the trainable adapter
    disabled) is the fine-tuned model, not the base; its export is a merged transformers folder that scores the same
    in a process without mmgrpo."""
    from mmgrpo.train.config import resolved_config
    from mmgrpo.train.export import export_policy

    lora = vlm[0]["lora"]
    run = Path(json.loads((lora / "mmgrpo_export.json").read_text())["run"])
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    question = {"question": "How many red circles are there?", "options": ["1", "2", "3"]}
    case, _, lora_logp = vlm_case(policy_of(run), question, image)
    cfg = load_config(run / "config.yaml")
    _, _, base_logp = vlm_case(build_policy(cfg), question, image)
    cfg.policy.options["init_lora"] = str(lora)
    pinned = resolved_config(cfg).policy.options["init_lora_sha256"]  # what the run's config.yaml keeps
    assert pinned == hashlib.sha256((lora / "adapter_model.safetensors").read_bytes()).hexdigest()
    cfg.policy.options["init_lora_sha256"] = "0" * 64  # another file than the one the run began from
    with pytest.raises(UserError, match=r"adapter_model.safetensors changed since the run began"):
        build_policy(cfg)
    cfg.policy.options["init_lora_sha256"] = pinned
    started = build_policy(cfg)  # the run's options (rank 2), started from its own export
    _, _, logp = vlm_case(started, question, image)
    assert (logp - lora_logp).abs().max() < TOL < (base_logp - lora_logp).abs().max()
    scorer = started._scorer()
    with scorer.vlm.disable_adapter(), torch.no_grad():  # the KL reference: the merged model
        prompt = started.prepare(question, {"image": image})
        ref, _ = scorer([prompt], torch.tensor([case["completion"]]))
    assert (ref[0] - lora_logp).abs().max() < TOL
    with pytest.warns(UserWarning, match=r"started from the LoRA .* full model folder"):
        out = export_policy(started, tmp_path / "out")
    assert json.loads((out / "mmgrpo_export.json").read_text())["merged"] is True
    case["runs"] = [["init", str(out), "-"]]
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_clean(VLM_SCRIPT, str(tmp_path))
    assert (load_file(str(tmp_path / "out.safetensors"))["init"] - logp).abs().max() < TOL


def test_init_lora_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """A run's config.yaml must name the adapter wherever it is read from (resume, sample --run, export): a bare
    folder name under the current directory becomes its absolute path, as policy.options.path does."""
    from mmgrpo.train.config import resolved_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    over = [f"policy.options.path={REPO / 'assets' / 'shapes_t2i'}", "policy.options.init_lora=sft"]
    cfg = resolved_config(load_config(REPO / "configs" / "shapes_t2i_grpo.yaml", over))  # what config.yaml keeps
    assert cfg.policy.options["init_lora"] == str(tmp_path / "sft")
    assert cfg.policy.options["init_lora_sha256"] == hashlib.sha256(b"weights").hexdigest()  # pinned


def test_sample_takes_the_start_lora_from_the_run_that_wrote_the_checkpoint(tmp_path):
    """`mmgrpo sample --run RUN --config OTHER`: the checkpoint's LoRA options come from the run (they must match its
    weights); init_lora is one of them (its adapter trained on top of the merge), so a config without it sampled the
    base with the trained adapter, silently another model."""
    from mmgrpo.train.sample import resolve_policy_options

    (tmp_path / "sft").mkdir()
    shapes = str(REPO / "assets" / "shapes_t2i")
    run_cfg = load_config(REPO / "configs" / "shapes_t2i_grpo.yaml",
                          [f"policy.options.path={shapes}", f"policy.options.init_lora={tmp_path / 'sft'}",
                           "policy.options.lora_rank=4"])  # fmt: skip
    other = load_config(REPO / "configs" / "shapes_t2i_grpo.yaml", [f"policy.options.path={shapes}"])
    opts = resolve_policy_options(other, run_cfg, None, None, with_lora=True)
    assert opts.init_lora == str(tmp_path / "sft") and opts.lora_rank == 4


def test_sample_with_a_lora_draws_what_the_merged_model_draws(sd3, tmp_path, capsys):
    """`mmgrpo sample --model BASE --lora DIR`: best-of-N with a LoRA merged in, as init_lora merges it; the samples
    are those of the full folder with that LoRA merged (mmgrpo export --merge of the same run)."""
    _, exports, _ = sd3
    lora, merged = exports["lora"], exports["merged"]
    base = json.loads((lora / "mmgrpo_export.json").read_text())["base"]
    common = ["--family", "sd3", "--prompts", PROMPT, "--best-of", "2", "--reward", "jpeg_incompressibility",
              "--steps", str(T)]  # fmt: skip
    assert cli_main(["sample", "--model", base, "--lora", str(lora), *common, "--out", str(tmp_path / "a")]) == 0
    assert cli_main(["sample", "--model", str(merged), *common, "--out", str(tmp_path / "b")]) == 0
    assert cli_main(["sample", "--model", base, *common, "--out", str(tmp_path / "c")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / x / "best_0.png"), dtype=np.int16) for x in "abc")
    assert np.abs(a - b).max() <= 1 < 3 < np.abs(a - c).max()  # one trained step moves the images a little
    assert json.loads((tmp_path / "a" / "scores.json").read_text())["lora"] == str(lora)
    run = json.loads((lora / "mmgrpo_export.json").read_text())["run"]
    argv = ["sample", "--run", run, "--lora", str(lora), *common, "--out", str(tmp_path / "d")]
    assert cli_main(argv) == 2 and "--lora" in capsys.readouterr().err and not (tmp_path / "d").exists()
