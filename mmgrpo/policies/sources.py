"""Where a model's weights come from: a local folder, a hub repository (revision, variant) or a single file.

One resolution for every model the library loads (the diffusion families, the VLM policy, the frozen listener VLM):

- ``path`` that is a local folder is used as it is (safetensors only: :func:`~mmgrpo.core.safe_weights.
  refuse_pickle_weights` refuses a folder whose weights exist only as pickles);
- anything else of the form ``org/name`` is a hub repository id, read at ``revision`` (a branch, tag or commit; the
  default branch when unset) through the Hugging Face cache, so ``HF_HUB_OFFLINE=1`` with a cached snapshot works.
  A diffusers pipeline is fetched the way ``DiffusionPipeline.from_pretrained`` fetches it, with
  ``DiffusionPipeline.download`` (only the components the family loads, only safetensors files of the variant) and
  then loaded from that snapshot folder exactly like a local folder; a transformers model (VLM) is passed to
  ``from_pretrained(repo_id, revision=, variant=)`` as it is;
- ``variant`` (``fp16``, ``bf16``, ...) selects the ``*.<variant>.safetensors`` weights that
  ``save_pretrained(variant=...)`` writes, in a local folder as on the hub;
- ``denoiser_file`` (diffusion only) is one ``.safetensors`` file, in the original / ComfyUI key layout or in the
  diffusers one, that replaces the denoiser of the pipeline ``path`` (which still gives its config, the text
  encoders and the VAE): diffusers' ``from_single_file`` converts it. A local file or a hub file URL
  ``https://huggingface.co/<org>/<name>/blob/<revision>/<file>.safetensors``.

When the hub cannot give the files (no network and not in the cache, a wrong id or revision), the library's error
becomes a :class:`~mmgrpo.core.errors.UserError` naming the repo, the revision and the ``hf download`` command that
fetches exactly what is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import shlex
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.safe_weights import NO_HUB_KERNELS, PICKLE_SUFFIXES

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""a hub repository id ``org/name`` (huggingface_hub's naming rules, less the rarer ones)"""
HUB_FILE = re.compile(r"(?:https?://)?(?:huggingface\.co|hf\.co)/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)")
"""a hub file URL: (repo id, revision, path in the repository)"""
VARIANT = re.compile(r"[A-Za-z0-9][\w-]*")
WEIGHTS_VARIANT = re.compile(r"(?:diffusion_pytorch_model|model)\.([\w-]+?)(?:-\d+-of-\d+)?\.safetensors")
"""a weights file of a variant, as diffusers / transformers ``save_pretrained(variant=...)`` name them"""
NOT_DOWNLOADED = (*(f"*{s}" for s in PICKLE_SUFFIXES), "*.msgpack", "*.h5")
"""files a download command skips: pickles (refused anyway) and Flax / TensorFlow weights"""


def is_hub_id(path: str) -> bool:
    """``path`` is not a local folder and reads as a hub repository id ``org/name``."""
    text = str(path)
    if Path(text).expanduser().is_dir() or not HUB_ID.fullmatch(text):
        return False
    return "--" not in text and ".." not in text and not text.endswith((".git", "."))


def check_source_options(key: str, revision: str | None, variant: str | None, denoiser_file: str | None = None):
    """The checks a config can get before any model loads (``key``: the ``path`` option, e.g.
    ``policy.options.path``; the other options are its siblings)."""
    if revision is not None and not str(revision).strip():
        raise UserError(f"{sibling(key, 'revision')} is empty; give a branch, tag or commit hash, or null for the "
                        "default branch")  # fmt: skip
    if variant is not None and not VARIANT.fullmatch(str(variant)):
        raise UserError(
            f"{sibling(key, 'variant')}={quoted(variant)} is not a weights variant name (fp16, bf16, ...: the "
            "<variant> of files *.<variant>.safetensors); null loads the plain weights"
        )
    if denoiser_file:
        name = str(denoiser_file)
        if name.endswith(PICKLE_SUFFIXES):
            raise UserError(
                f"{sibling(key, 'denoiser_file')}={quoted(name)} is a pickle, which can run code when loaded; mmgrpo "
                'reads safetensors only. If you trust it, convert it once: python -c "import torch, safetensors.torch'
                f" as s; sd = torch.load('{name}', weights_only=True); sd = sd.get('state_dict', sd); s.save_file("
                "{k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\" and point denoiser_file at it"
            )
        if not name.endswith(".safetensors"):
            raise UserError(f"{sibling(key, 'denoiser_file')}={quoted(name)} is not a .safetensors file; give "
                            "the denoiser's single-file checkpoint (original, ComfyUI or diffusers keys)")  # fmt: skip


def sibling(key: str, name: str) -> str:
    """The option ``name`` next to ``key``: ``policy.options.path`` -> ``policy.options.variant``."""
    return f"{key.rpartition('.')[0]}.{name}" if "." in key else name


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location (see the module docstring); ``os.fspath`` gives ``path``.

    ``local``: ``path`` is a folder on this machine (the user's, or the snapshot a hub download left in the cache);
    ``hub_id``: the repository the files come from (None for the user's own folder); ``parts``: the sub-folders a
    diffusers pipeline is read from (what a download command must fetch; empty: the whole repository).
    """

    path: str
    key: str = "policy.options.path"
    revision: str | None = None
    variant: str | None = None
    denoiser_file: str | None = None
    local: bool = True
    hub_id: str | None = None
    parts: tuple[str, ...] = ()
    denoiser: str | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def weights(self, subfolder: str | None = None) -> dict[str, Any]:
        """``from_pretrained`` keywords of a weights component: safetensors only, the variant, the revision (hub).

        As diffusers' pipelines do, a component of a local pipeline folder without files of the variant is read
        from its plain files (with a warning) when other components have them; a variant no component has is
        passed on, and the library's error names it.
        """
        out: dict[str, Any] = {"use_safetensors": True, **self.files(subfolder)}
        if self.variant:
            out["variant"] = self.variant
            if self.local and subfolder and self.variant in variants_in(self.path):
                if self.variant not in variants_in(Path(self.path) / subfolder, subfolders=False):
                    warnings.warn(f"{self.describe()}: {subfolder}/ has no {self.variant} weights; reading its plain "
                                  "files", stacklevel=3)  # fmt: skip
                    del out["variant"]
        return out

    def encoder_weights(self, subfolder: str) -> dict[str, Any]:
        """:meth:`weights` of a transformers model (a text or image encoder), without the hub's kernels
        (:data:`~mmgrpo.core.safe_weights.NO_HUB_KERNELS`)."""
        return {**self.weights(subfolder), **NO_HUB_KERNELS}

    def files(self, subfolder: str | None = None) -> dict[str, Any]:
        """``from_pretrained`` keywords of a component without weights (config, tokenizer, processor, scheduler)."""
        out: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
        if not self.local and self.revision:
            out["revision"] = self.revision
        return out

    def describe(self) -> str:
        """``'org/name' (revision 'v1', variant 'fp16')`` for messages."""
        extra = [f"revision {self.revision!r}"] if self.revision else []
        extra += [f"variant {self.variant!r}"] if self.variant else []
        name = self.hub_id or self.path
        return f"{name!r}" + (f" ({', '.join(extra)})" if extra else "")

    def download_command(self) -> str:
        """The ``hf download`` command that fetches what this source reads, into ``models/<name>``."""
        include = []
        if self.parts:
            include = ["model_index.json"] + [
                f"{p}/config.json" if p == self.denoiser and self.denoiser_file else f"{p}/*" for p in self.parts
            ]
        return download_command(self.hub_id or self.path, self.revision, include=include)

    @contextlib.contextmanager
    def errors(self, hint: str = "") -> Iterator[None]:
        """Turn the loading libraries' file errors (``OSError``) into one UserError that says what to fetch
        (``hint``: what a local folder must hold)."""
        try:
            yield
        except OSError as e:
            raise UserError(self.failure(e, hint)) from e

    def failure(self, e: BaseException, hint: str = "") -> str:
        reason = _first_line(e)
        if self.hub_id is not None or not self.local:
            repo = self.hub_id or self.path
            where = "" if Path(repo).is_absolute() else f" under the current directory ({Path.cwd()})"
            return (
                f"{self.key}={repo!r} is not a local folder{where}, so it is read as a hub repository id "
                f"(revision {self.revision or 'main'!r}{f', variant {self.variant!r}' if self.variant else ''}), "
                f"and its files could not be read: {reason}. Download them once where the hub is reachable: "
                f"`{self.download_command()}`, then set {self.key}: {local_dir(repo)}; or run the same command "
                "without --local-dir, which fills the Hugging Face cache (HF_HOME), and keep the hub id: runs read "
                "the cache, also with HF_HUB_OFFLINE=1"
            )
        found = variants_in(self.path)
        if self.variant:
            hint = (
                f"{sibling(self.key, 'variant')}={self.variant!r} reads the files *.{self.variant}.safetensors that "
                f"save_pretrained(..., variant=...) writes (this folder has variants: {found or 'none'}); set it to "
                f"null to read the plain ones. {hint}"
            )
        elif found:
            hint = (
                f"the folder holds weights variants {found} (*.<variant>.safetensors): set "
                f"{sibling(self.key, 'variant')}: {found[0]} to read them. {hint}"
            )
        return f"{self.key}={self.path!r} cannot be loaded: {reason}" + (f". {hint.strip()}" if hint else "")


def resolve_source(
    path: str | os.PathLike | ModelSource,
    key: str = "policy.options.path",
    revision: str | None = None,
    variant: str | None = None,
    denoiser_file: str | None = None,
) -> ModelSource:
    """``path`` (+ options) -> a :class:`ModelSource`: a local folder as it is, else a hub id; checked."""
    if isinstance(path, ModelSource):
        return path
    text = str(path).strip()
    if not text:
        raise UserError(f"{key} is empty: give a local model folder or a hub repository id (org/name)")
    check_source_options(key, revision, variant, denoiser_file)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if revision:
            raise UserError(f"{sibling(key, 'revision')}={revision!r} is for hub ids, but {key}={text!r} is a local "
                            "folder (one version of the files); drop the revision or give the hub id")  # fmt: skip
        return ModelSource(str(folder), key, None, variant or None, denoiser_file or None)
    if not is_hub_id(text):
        raise UserError(f"{key}: model path {text!r} is not a directory, and not a hub repository id (org/name); "
                        "give a local model folder (diffusers / transformers layout) or a hub id")  # fmt: skip
    return ModelSource(text, key, revision or None, variant or None, denoiser_file or None, local=False)


def pipeline_source(
    path: str | os.PathLike | ModelSource, parts: Sequence[str], denoiser: str | None = None
) -> ModelSource:
    """``path`` as the :class:`ModelSource` of a pipeline of the sub-folders ``parts``: what :func:`component_config`
    and :func:`pipeline_folder` read, so that a hub id's error names the exact download (its ``--include`` list)."""
    return dataclasses.replace(resolve_source(path), parts=tuple(parts), denoiser=denoiser)


def pipeline_folder(
    path: str | os.PathLike | ModelSource, parts: Sequence[str], denoiser: str | None = None
) -> ModelSource:
    """A diffusers pipeline as a local folder: a local source as it is; a hub id fetched (or found in the HF cache)
    by ``DiffusionPipeline.download``, limited to the sub-folders ``parts`` the family loads, safetensors of the
    variant only (with a ``denoiser_file``, only the ``denoiser`` sub-folder's config.json)."""
    src = pipeline_source(path, parts, denoiser)
    if src.local:
        return src
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    repo, rev = src.path, src.revision
    with src.errors():
        index = json.loads(Path(hf_hub_download(repo, "model_index.json", revision=rev)).read_text())
        skip = {k: None for k, v in index.items() if isinstance(v, list) and k not in parts}
        if src.denoiser_file and denoiser:
            skip[denoiser] = None  # its weights come from the single file; its config from the repository
            hf_hub_download(repo, f"{denoiser}/config.json", revision=rev)
        folder = DiffusionPipeline.download(repo, revision=rev, variant=src.variant, use_safetensors=True, **skip)
    return dataclasses.replace(src, path=str(folder), local=True, hub_id=repo)


def component_config(src: ModelSource, subfolder: str, cls: type | None = None) -> dict[str, Any] | None:
    """A pipeline component's ``<subfolder>/config.json``, read before any weights: checks that need only the
    config (a video family's patch size and VAE compression) refuse bad options before the weights load (minutes
    for a 14B transformer) or, for a hub id, before :func:`pipeline_folder` downloads them (tens of GB): that one
    small file is fetched alone, through the Hugging Face cache. With ``cls`` (the diffusers model class), a key the
    file lacks has the default of ``cls.__init__``, as ``register_to_config`` fills it in when the model loads (Wan
    2.1's vae/config.json has no ``scale_factor_spatial``). None when a local folder has no such file, or when it is
    the config of another class than ``cls`` (the loader then names what is wrong). Give ``src`` the pipeline's
    ``parts`` (:func:`pipeline_source`): a hub file that cannot be fetched then names the download the whole
    pipeline needs, as the loader would after its own retries."""
    if src.local:
        file = Path(src.path) / subfolder / "config.json"
        if not file.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download

        with src.errors():  # a ``src`` with its ``parts`` names the exact download the pipeline needs
            file = Path(hf_hub_download(src.path, f"{subfolder}/config.json", revision=src.revision))
    config = json.loads(file.read_text())
    if cls is None:
        return config
    if config.get("_class_name", cls.__name__) != cls.__name__:
        return None
    params = inspect.signature(cls.__init__).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **config}


def load_denoiser(src: ModelSource, cls: type, subfolder: str, torch_dtype: Any) -> Any:
    """The pipeline's denoiser ``cls`` from ``src``'s ``subfolder``, or from ``src.denoiser_file`` (its config from the
    sub-folder) through diffusers' ``from_single_file``, which converts original / ComfyUI key layouts."""
    if not src.denoiser_file:
        with src.errors():
            return cls.from_pretrained(src.path, torch_dtype=torch_dtype, **src.weights(subfolder))
    key = sibling(src.key, "denoiser_file")
    if not hasattr(cls, "from_single_file"):
        raise UserError(f"{key}: this diffusers cannot load a {cls.__name__} from a single file (from_single_file); "
                        "upgrade diffusers or give a diffusers-layout folder")  # fmt: skip
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    file = single_file(src.denoiser_file, key)
    try:
        model = cls.from_single_file(file, config=src.path, subfolder=subfolder, torch_dtype=torch_dtype)
    except (ValueError, LookupError, RuntimeError, OSError, SingleFileComponentError) as e:
        # a file of another model: diffusers' key conversion fails at whatever its first lookup hits, or the model
        # keeps tensors the file has no weights for on the meta device and cannot be moved
        if "meta tensor" in str(e):
            raise UserError(f"{key}={src.denoiser_file!r} does not hold every tensor of the {cls.__name__} of "
                            f"{src.describe()} (diffusers left some without weights); is it this model's complete "
                            "denoiser?") from e  # fmt: skip
        raise UserError(f"{key}={src.denoiser_file!r} is not a {cls.__name__} with the config of {src.describe()}/"
                        f"{subfolder}: {_first_line(e)}") from e  # fmt: skip
    return model


def single_file(name: str, key: str) -> str:
    """A local path to the single-file checkpoint ``name``: a local file, or a hub file URL fetched into the cache."""
    match = HUB_FILE.fullmatch(name)
    if match is None:
        file = Path(name).expanduser()
        if not file.is_file():
            raise UserError(f"{key}={name!r} is not a file; give a local .safetensors file or a hub file URL "
                            "https://huggingface.co/<org>/<name>/blob/<revision>/<file>.safetensors")  # fmt: skip
        return str(file)
    from huggingface_hub import hf_hub_download

    repo, rev, filename = match.groups()
    try:
        return hf_hub_download(repo, filename, revision=rev)
    except OSError as e:
        cmd = download_command(repo, rev, files=[filename])
        raise UserError(
            f"{key}={name!r}: the hub file could not be read: {_first_line(e)}. Download it once where the hub is "
            f"reachable: `{cmd}`, then set {key}: {local_dir(repo)}/{filename}"
        ) from e


def download_command(repo: str, revision: str | None, include: Sequence[str] = (), files: Sequence[str] = ()) -> str:
    """``hf download`` of ``repo`` at ``revision`` (main when None) into ``models/<name>``: the ``files``, or the
    ``include`` patterns (everything when empty) less pickles and Flax / TensorFlow weights."""
    words = ["hf", "download", repo, *files, "--revision", revision or "main"]
    if not files:
        for pattern in include:
            words += ["--include", pattern]
        for pattern in NOT_DOWNLOADED:
            words += ["--exclude", pattern]
    words += ["--local-dir", local_dir(repo)]
    return " ".join(shlex.quote(w) for w in words)


def variants_in(path: str | Path, subfolders: bool = True) -> list[str]:
    """The weights variants (``fp16`` of ``model.fp16.safetensors``, of shards ``model.fp16-00001-of-00002``) in a
    folder and (``subfolders``) its direct sub-folders."""
    root = Path(path)
    if not root.is_dir():
        return []
    folders = [root, *(p for p in root.iterdir() if p.is_dir() and subfolders)]
    names = [f.name for folder in folders for f in folder.glob("*.safetensors")]
    return sorted({m.group(1) for m in map(WEIGHTS_VARIANT.fullmatch, names) if m})


def local_dir(repo: str) -> str:
    return f"models/{repo.rpartition('/')[2]}"


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[:2]).strip().rstrip(".") or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def refuse_lora_folder(path: str | os.PathLike, key: str, shown: str | None = None) -> None:
    """A UserError when the local folder ``path`` (given as ``key``) is a LoRA adapter rather than a model: an
    mmgrpo LoRA export (``mmgrpo_export.json`` says so), a diffusers LoRA (``pytorch_lora_weights.safetensors``) or
    a peft adapter (``adapter_config.json``) with no model beside it (``model_index.json``, ``config.json``). The
    loaders' own words were about the layout ("has no transformer/ folder; is it an SD3-layout checkpoint?",
    transformers' "Unrecognized model ... Should have a `model_type` key"); this names the base it adapts
    (recorded by the export, or peft's ``base_model_name_or_path``) and the ways to a full model. ``shown``: what
    the user gave, where ``path`` is the hub cache's snapshot of it (:func:`refuse_cached_lora`)."""
    folder = Path(os.fspath(path)).expanduser()
    shown = shown or os.fspath(path)
    if not folder.is_dir() or (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return

    def read(name: str) -> dict:
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    info, peft = read("mmgrpo_export.json"), read("adapter_config.json")
    if (folder / "pytorch_lora_weights.safetensors").is_file() or info.get("format") == "diffusers_lora":
        kind, use = "diffusers format", f"pipe.load_lora_weights('{shown}') on the base pipeline"
    elif (folder / "adapter_config.json").is_file() or info.get("format") == "peft_adapter":
        kind, use = "peft format", f"peft.PeftModel.from_pretrained(base_model, '{shown}')"
    else:
        return
    base = info.get("base") or peft.get("base_model_name_or_path")
    of, given = (f", of base {base}", f" ({base})") if base else ("", "")
    run = info.get("run") or "RUN"
    start = (f"; to train from the adapter, give it as policy.options.init_lora='{shown}' (merged into the base as "
             "it loads)" if key == "policy.options.path" else "")  # fmt: skip
    raise UserError(f"{key}='{shown}' is a LoRA adapter ({kind}{of}), not a model: give the base model as "
                    f"{key}{given}, onto which the adapter loads outside mmgrpo with {use}{start}; or export a full "
                    f"model folder with the adapter merged in (mmgrpo export {run} --merge --out DIR) and give "
                    "that")  # fmt: skip


ADAPTER_FILES = ("adapter_config.json", "pytorch_lora_weights.safetensors", "mmgrpo_export.json")
"""the files that mark a LoRA adapter (peft, diffusers, an mmgrpo export): :func:`refuse_lora_folder`"""


def refuse_cached_lora(src: ModelSource) -> None:
    """:func:`refuse_lora_folder` for a hub id whose snapshot is in the hub cache (read offline, without the
    network): a LoRA repository given as the model was the loaders' words about the layout, as a local one was."""
    from huggingface_hub import try_to_load_from_cache

    repo = src.hub_id or src.path
    for name in ADAPTER_FILES:
        try:
            found = try_to_load_from_cache(repo, name, revision=src.revision)
        except (OSError, ValueError):  # a malformed id or cache: the loader's own error says more
            return
        if isinstance(found, str):
            refuse_lora_folder(Path(found).parent, src.key, shown=repo)
            return
