"""The Python packages bench/gpu_check.py needs that a lent GPU machine lacks, as wheels to carry there.

The lent machines run the workplace's own image: Python 3.12, torch, transformers, accelerate, peft, tokenizers,
safetensors, numpy, pandas, pyarrow, matplotlib, pytest, ... but no diffusers, trl or datasets, and a transformers
(5.17) older than mmgrpo's 5.18; nothing can be installed there from the network. This script downloads, here, the
wheels of :data:`CARRY` at the versions installed in this environment (the ones the test suite passed with) for
that machine's Python and platform, into ``.whl/`` (git ignores it), and prints the command that installs them
there and runs the check::

    python bench/device_wheels.py                       # here: ~25 MB of wheels into .whl/
    # then the device tool's run, with carry [".whl"] and the printed command

mmgrpo itself is not installed there: the checks run from the checkout (its root on ``PYTHONPATH``), as
``python -m mmgrpo.train.cli``. ``--python-version 3.11 --platform-any`` gives wheels this machine's Python can
install, which is how the bundle is tried here against the image's package versions (tests/bench/test_device_wheels.py
checks the list and the command; a run of the check with them is in bench/results/device_bundle.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What to carry: the distributions the check imports (directly or through the ones listed) that the image lacks, or
# has at a version below what the ones here require (the image's, as last read: transformers 5.17, accelerate
# 1.15, huggingface_hub 1.33). Large binary ones the image has at a version that does (torch, numpy, pyarrow,
# pandas, tokenizers, safetensors) stay out: the machine takes at most 64 MiB with the checkout.
CARRY = (
    "diffusers",  # not in the image
    "transformers",  # the image's 5.17 < mmgrpo's 5.18
    "huggingface_hub",  # transformers >= 5.25 needs >= 2.4 (the image: 1.33)
    "httpx2",  # huggingface_hub 2.x's HTTP client, and its own needs:
    "httpcore2",
    "truststore",
    "hf_xet",
    "click",  # huggingface_hub 2.x needs >= 8.4.2
    "kernels",  # transformers' hub kernels (imported by its layers)
    "tomlkit",  # kernels'
    "regex",  # transformers needs >= 2025.10.22
    "accelerate",  # the version the tests ran (the image's 1.15 would do for mmgrpo)
    "peft",  # LoRA: the version the tests ran
    "trl",  # bench/peers.py's TRL side (section 9)
    "datasets",  # trl's
    "dill",  # datasets'
    "multiprocess",
    "fsspec",  # datasets needs <= 2026.9
)

# the device's Python and platform tags (the device tool's README); pure-Python wheels match any of them
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip


def versions(names: tuple[str, ...] = CARRY) -> dict[str, str]:
    """name -> the version installed here; an error naming what is missing (install the dev extra first)."""
    found, missing = {}, []
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed in this environment: {', '.join(missing)} (pip install -e '.[dev]')")
    return found


def download_command(name: str, version: str, out: Path, python_version: str, platform_any: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(out),
           "--python-version", python_version, "--implementation", "cp", f"{name}=={version}"]  # fmt: skip
    if not platform_any:
        for tag in PLATFORMS:
            cmd += ["--platform", tag]
    return cmd


def device_command(wheels: str = ".whl", site: str = "/tmp/site") -> str:
    """The device command: install the carried wheels into ``site`` (no index, no dependencies: the image has the
    rest), put it and the checkout on PYTHONPATH, run bench/gpu_check.py with its report written to $OUT (what
    comes back from the machine), then give back."""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
        f"{wheels}/*.whl && export PYTHONPATH={site}:$PWD PYTHONUNBUFFERED=1 || exit; "
        "python3 bench/gpu_check.py --time-limit 480 --out $OUT 2>&1 | tee $OUT/gpu_check.log"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / ".whl"), help="folder of the wheels (default: .whl in the checkout)")
    p.add_argument("--python-version", default="3.12", help="the device's Python (3.12)")
    p.add_argument("--platform-any", action="store_true", help="wheels for this machine (to try the bundle here)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # one version of each: two stop the install there
        old.unlink()
    for name, version in versions().items():
        print(f"  {name}=={version}", flush=True)
        subprocess.run(download_command(name, version, out, args.python_version, args.platform_any), check=True)
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out}")
    print('device command (carry: [".whl"]):\n' + device_command(out.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
