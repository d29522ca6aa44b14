"""Imports every module that registers built-in rewards (kept in one list so `mmgrpo list` sees them all)."""

import importlib

_MODULES = [
    "rewards.bandit",
    "rewards.shapes",
    "rewards.remote",
    "rewards.text",
    "rewards.jpeg",
    "rewards.image",
    "rewards.similarity",
    "rewards.video",
    "rewards.curriculum",
    "rewards.consensus",
    "rewards.listener",
    "rewards.vlm_listener",
    "rewards.acre",
    "rewards.pearl",
]

for _m in _MODULES:
    importlib.import_module(_m)
