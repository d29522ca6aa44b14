"""Print a pip constraints file that pins the dependencies of pyproject.toml with a lower bound to that bound.

    python .ci/minima.py vlm diffusion > constraints.txt   # "transformers==5.18.0", ...: the core and those extras

torch and torchvision are pinned too (to 2.6 and 0.21: nothing may upgrade them); left out are requirements without a
lower bound and the extras' references to mmgrpo itself. Two extras that give one package
different bounds would need one constraint each: that is an error here, fix pyproject.toml.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

SKIP = {"mmgrpo"}


def minima(pyproject: Path, extras: list[str]) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    out: dict[str, str] = {}
    for req in reqs:
        spec = req.split(";")[0].strip()  # environment markers: the bound is the same where the package installs
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", spec)
        name, specifiers = m.group(1).lower().replace("_", "-"), m.group(3)
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", specifiers)
        if name in SKIP or low is None:
            continue
        if out.setdefault(name, low.group(1)) != low.group(1):
            sys.exit(f"{name} has two lower bounds in pyproject.toml: >={out[name]} and >={low.group(1)}")
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name, version in sorted(minima(root / "pyproject.toml", sys.argv[1:]).items()):
        print(f"{name}=={version}")
