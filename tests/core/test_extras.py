"""Optional dependencies: a feature whose package is missing (a ``None`` entry in ``sys.modules``: Python's own
ImportError path) or too old stops with one UserError line naming ``pip install "mmgrpo[EXTRA]"``; the extras the
helper names are the ones pyproject.toml declares; ``import mmgrpo`` and ``mmgrpo list`` need none of them."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import DISTRIBUTIONS, EXTRAS, needs
from mmgrpo.core.files import open_video
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions, load_vlm
from mmgrpo.rewards.similarity import lpips as lpips_reward
from mmgrpo.testing.tiny_vlm import tiny_qwen2_vl

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = sorted({m for modules in EXTRAS.values() for m in modules} | {"tokenizers", "datasets", "tensorboard"})


def run_blocked(blocked, code):
    """Run ``code`` in a fresh interpreter where every module in ``blocked`` fails to import."""
    prelude = f"import sys\nfor m in {list(blocked)!r}:\n    sys.modules[m] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError) as e:
        with needs("diffusion", "the sd3 model family"):
            from diffusers import SD3Transformer2DModel  # noqa: F401
    assert (
        str(e.value) == 'the sd3 model family needs diffusers, which is not installed: pip install "mmgrpo[diffusion]"'
    )
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(UserError) as e:
        with needs("rewards", "an open_clip model"):
            import open_clip  # noqa: F401
    assert (
        str(e.value)
        == 'an open_clip model needs open_clip_torch, which is not installed: pip install "mmgrpo[rewards]"'
    )


def test_a_package_too_old_for_the_import_says_to_upgrade():
    version = importlib.metadata.version("transformers")
    with pytest.raises(UserError) as e:
        with needs("vlm", "the qwen9_vl VLM family"):
            from transformers import Qwen9VLForConditionalGeneration  # noqa: F401
    msg = str(e.value)
    assert msg.startswith(f"the qwen9_vl VLM family needs a newer transformers than the installed {version} (")
    assert "Qwen9VLForConditionalGeneration" in msg and msg.endswith('pip install -U "mmgrpo[vlm]"')
    assert "\n" not in msg


def test_other_import_errors_keep_their_traceback(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match="mmgrpo_no_such_module"):
        with needs("vlm", "x"):
            import mmgrpo_no_such_module  # noqa: F401
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ModuleNotFoundError, match="diffusers"):  # not a package of the vlm extra
        with needs("vlm", "x"):
            import diffusers  # noqa: F401
    with pytest.raises(ValueError, match="unknown extra 'vlms'"):
        with needs("vlms", "x"):
            pass


def test_every_extra_the_helper_names_is_declared_with_its_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        declared = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in extras[extra]}
        for module in modules:
            dist = DISTRIBUTIONS.get(module, module)
            # decord is optional (no wheels for Linux aarch64 / macOS arm64): the video extra installs PyAV only
            assert module == "decord" or dist.lower() in declared, f"{dist} is not in the [{extra}] extra"


def test_vlm_loading_and_lora_name_the_vlm_extra(monkeypatch):
    asset = str(ROOT / "assets" / "tiny_qwen2_vl")
    model, processor = tiny_qwen2_vl()
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UserError) as e:
        VLMPolicy(model, processor, VLMPolicyOptions(finetune="lora"))
    assert str(e.value) == (
        "LoRA fine-tuning of a VLM (policy.options.finetune=lora) needs peft, which is not installed: "
        'pip install "mmgrpo[vlm]"'
    )
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r'^loading a VLM needs transformers, .*: pip install "mmgrpo\[vlm\]"$'):
        load_vlm(asset, VLMPolicyOptions(path=asset))


def test_reading_a_video_without_pyav_or_decord_names_the_video_extra(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not read: the reader is missing")
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(UserError) as e:
        open_video(path, "a test")
    assert str(e.value) == 'reading videos needs av, which is not installed: pip install "mmgrpo[video]"'


def test_a_diffusion_run_without_diffusers_ends_with_one_line_and_a_non_zero_exit(tmp_path):
    code = (
        "from mmgrpo.train.cli import main\n"
        f"sys.exit(main(['train', 'configs/shapes_t2i_grpo.yaml', 'run.output_dir={tmp_path}', "
        "'trainer.max_steps=1']))"
    )
    proc = run_blocked(["diffusers"], code)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0] == (
        'error: the sd3 model family needs diffusers, which is not installed: pip install "mmgrpo[diffusion]"'
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_import_and_list_need_no_optional_package():
    proc = run_blocked(OPTIONAL, "import mmgrpo\nfrom mmgrpo.train.cli import main\nsys.exit(main(['list']))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vlm_reasoning" in proc.stdout and "text_to_image" in proc.stdout
    leaked = run_blocked([], "import mmgrpo.train.cli, sys\nprint(sorted(m for m in sys.modules))")
    loaded = set(eval(leaked.stdout))
    assert not loaded & {"diffusers", "transformers", "peft", "open_clip", "av", "decord"}


def test_a_similarity_reward_without_lpips_names_the_similarity_extra(tmp_path, monkeypatch):
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    weights.write_bytes(b"checked for existence only: the missing package is reported first")
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(UserError) as e:
        lpips_reward(backbone_weights=str(weights))
    assert str(e.value) == "reward 'lpips' needs lpips, which is not installed: pip install \"mmgrpo[similarity]\""
