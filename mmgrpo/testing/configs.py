"""A shipped config shrunk to one CPU-sized training step: only what cannot exist on a test machine is swapped.

:func:`tiny_overrides` keeps a config's recipe, methods, policy strategy blocks (``sde``, ``exploration``,
``objective``), dtype, LoRA, loss and advantage settings, and replaces

- a model path that does not exist by a tiny checkpoint of the same family, written under ``tmp_path``;
- sizes by the tiny model's (``height``/``width``/``num_frames``), ``num_steps`` <= 4, ``max_new_tokens`` <= 16,
  1 step of 1-2 prompts x G = 2, no evaluation, no progress bar, a handful of generated examples;
- prompt files that do not exist by the built-in shapes prompts, first-frame pairs by two generated images;
- rewards that need downloaded weights by a cheap reward of the same modality (CLIP embedders by pixels, image
  preference models by JPEG incompressibility); local rewards (shapes, format, accuracy, iou, the methods') stay;
- adapter options that assume a full-size text encoder (``max_sequence_length``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmgrpo.testing.tiny_flux import TINY_SIZE as FLUX_SIZE
from mmgrpo.testing.tiny_flux import save_tiny_flux
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE as HUNYUAN_SIZE
from mmgrpo.testing.tiny_hunyuan_video import save_tiny_hunyuan_video
from mmgrpo.testing.tiny_sd import save_tiny_sd
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.testing.tiny_wan import SIZE as WAN_SIZE
from mmgrpo.testing.tiny_wan import save_tiny_wan

DIFFUSION_PIPELINES = ("text_to_image", "text_to_video", "image_to_video")
TINY_SIZES: dict[str, dict[str, int]] = {  # family -> the tiny checkpoint's sample size (0 = the model default)
    "sd3": {"height": 0, "width": 0},
    "sd": {"height": 0, "width": 0},
    "flux": {"height": FLUX_SIZE, "width": FLUX_SIZE},
    "wan": dict(WAN_SIZE),
    "hunyuan_video": dict(HUNYUAN_SIZE),
}
WEIGHTED_IMAGE_REWARDS = {"pickscore", "hpsv2", "clip_score", "aesthetic", "image_reward", "lpips", "dreamsim"}
"""rewards that load a downloaded preference / similarity model"""
EMBEDDER_REWARDS = {"temporal_consistency", "diversity"}
"""rewards with a weight-free embedder ('pixels') besides CLIP"""
CHEAP_IMAGE_REWARDS = [
    {"name": "jpeg_incompressibility", "options": {}},
    {"name": "diversity", "options": {"embedder": "pixels"}},
]
"""weight-free image rewards, in the order they replace weighted ones (distinct names: each keeps its metric)"""
MAX_STEPS, MAX_NEW_TOKENS, GROUP_SIZE, MAX_PROMPTS = 4, 16, 2, 2


def save_tiny_family(family: str, path: str | Path, *, xl: bool = False, image_to_video: bool = False) -> str:
    """Write the tiny checkpoint of ``family`` (``xl``: SDXL for sd; ``image_to_video``: Wan I2V) to ``path``."""
    writers: dict[str, Callable[[Path], str]] = {
        "sd3": save_tiny_sd3,
        "flux": save_tiny_flux,
        "sd": lambda p: save_tiny_sd(p, xl=xl),
        "wan": lambda p: save_tiny_wan(p, image_to_video=image_to_video),
        "hunyuan_video": save_tiny_hunyuan_video,
    }
    return writers[family](Path(path))


def tiny_reward(spec: dict, taken: set[str] = frozenset()) -> dict:
    """``spec`` with its downloaded weights swapped for a cheap reward of the same modality whose name is not in
    ``taken`` (the config's other rewards)."""
    name, options = spec["name"], dict(spec.get("options", {}))
    if name in EMBEDDER_REWARDS:
        return {**spec, "options": {"embedder": "pixels"}}
    if name in WEIGHTED_IMAGE_REWARDS:
        return {**spec, **next((r for r in CHEAP_IMAGE_REWARDS if r["name"] not in taken), CHEAP_IMAGE_REWARDS[0])}
    if name == "video_frames":  # keep the per-frame wrapper, swap the image reward inside it
        inner = tiny_reward({"name": options["reward"], "options": options.get("reward_options", {})})
        return {**spec, "options": {**options, "reward": inner["name"], "reward_options": inner["options"]}}
    return spec


def write_frame_pairs(directory: Path, n: int = 2) -> str:
    """A JSONL of ``n`` {prompt, image} first-frame conditions (random 40x48 images) for image_to_video."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = (np.random.RandomState(i).rand(40, 48, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(directory / f"frame{i}.png")
        rows.append({"prompt": ["a red circle", "two blue squares"][i % 2], "image": f"frame{i}.png"})
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tiny_diffusion(data: dict, popts: dict, tmp_path: Path) -> None:
    family, pipeline = popts.get("family", "sd3"), data["pipeline"]
    if not (popts.get("path") and Path(popts["path"]).exists()):
        xl = "xl" in str(popts.get("path", "")).lower() or "xl" in data.get("run", {}).get("name", "")
        popts["path"] = save_tiny_family(family, tmp_path / "ckpt", xl=xl, image_to_video=pipeline == "image_to_video")
        popts.update(TINY_SIZES[family])
    popts["num_steps"] = min(popts.get("num_steps", MAX_STEPS), MAX_STEPS)
    popts["adapter_options"] = {
        k: v for k, v in popts.get("adapter_options", {}).items() if k != "max_sequence_length"
    }
    dopts = data.setdefault("data", {}).setdefault("options", {})
    if pipeline == "image_to_video":
        dopts.update(pairs=write_frame_pairs(tmp_path / "pairs"), heldout_pairs="")
    else:
        if dopts.get("prompts", "shapes") != "shapes" and not Path(dopts["prompts"]).is_file():
            dopts["prompts"] = "shapes"
        dopts["heldout_prompts"] = ""


def _tiny_vlm(data: dict, popts: dict) -> None:
    popts["max_new_tokens"] = min(popts.get("max_new_tokens", MAX_NEW_TOKENS), MAX_NEW_TOKENS)
    dopts = data.setdefault("data", {}).setdefault("options", {})
    for key, n in (("num_examples", 8), ("num_train", 8), ("eval_examples", 2)):
        if key in dopts:
            dopts[key] = min(dopts[key], n)


def tiny_overrides(cfg: dict[str, Any], tmp_path: str | Path) -> dict[str, Any]:
    """A copy of config ``cfg`` (as read from YAML) that runs 1 training step on a CPU, writing under ``tmp_path``."""
    data, tmp_path = copy.deepcopy(cfg), Path(tmp_path)
    data.setdefault("run", {})["output_dir"] = str(tmp_path / "runs")
    popts = data.setdefault("policy", {}).setdefault("options", {})
    if data.get("pipeline") in DIFFUSION_PIPELINES:
        _tiny_diffusion(data, popts, tmp_path)
    elif data.get("pipeline", "").startswith("vlm_"):
        _tiny_vlm(data, popts)
    rewards: list[dict] = []
    for spec in data.get("rewards", []):
        rewards.append(tiny_reward(spec, {r["name"] for r in rewards + data["rewards"]}))
    data["rewards"] = rewards
    trainer = data.setdefault("trainer", {})
    # G >= minibatches: every minibatch holds a slice of every group (the config's minibatch count is kept)
    group_size = max(GROUP_SIZE, int(trainer.get("minibatches", 1)))
    trainer.update(max_steps=1, group_size=group_size, eval_every=0, checkpoint_every=0, progress=False)
    trainer["prompts_per_step"] = min(trainer.get("prompts_per_step", 1), MAX_PROMPTS)
    return data
