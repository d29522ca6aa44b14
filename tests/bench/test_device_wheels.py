"""bench/device_wheels.py: the wheels a lent GPU machine lacks, and the command that runs the GPU check there."""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))
device_wheels = importlib.import_module("device_wheels")


def test_every_carried_package_is_pinned_to_the_version_installed_here(tmp_path):
    found = device_wheels.versions()
    assert set(found) == set(device_wheels.CARRY)
    for name in ("diffusers", "transformers", "trl", "datasets", "huggingface_hub"):
        assert name in found  # what the image lacks or has too old (the module's comment)
    cmd = device_wheels.download_command("diffusers", found["diffusers"], tmp_path, "3.12", platform_any=False)
    assert f"diffusers=={found['diffusers']}" in cmd and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in cmd
    assert "--platform" not in device_wheels.download_command("x", "1", tmp_path, "3.11", platform_any=True)


def test_the_device_command_keeps_the_carried_packages_and_brings_the_report_back():
    cmd = device_wheels.device_command()
    assert "--no-index --no-deps" in cmd and "--target /tmp/site .whl/*.whl" in cmd
    assert "PYTHONPATH=/tmp/site:$PWD" in cmd  # the checkout, not an installed mmgrpo
    assert "--out $OUT" in cmd  # only what is written under $OUT comes back from the machine
    assert len(cmd) < 2000  # the device tool's limit on a command


def test_a_child_process_keeps_the_parents_pythonpath(monkeypatch):
    gpu_common = importlib.import_module("gpu_common")
    assert gpu_common.with_root("/tmp/site").split(":") == [str(ROOT), "/tmp/site"]
    assert gpu_common.with_root(None) == str(ROOT)
