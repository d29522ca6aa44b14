"""Policies: adapters that turn a sampler or a VLM into something the group-relative optimizer trains.

``POLICIES`` names every policy class (shown by ``mmgrpo list``); recipes in ``pipelines/`` build them.
"""

from mmgrpo.core.registry import Registry

POLICIES: Registry[type] = Registry("policy")

POLICIES.add("bandit", "mmgrpo.policies.bandit:BanditPolicy", "tabular categorical bandit (K = 1 unit per row)")
POLICIES.add("vlm", "mmgrpo.policies.vlm:VLMPolicy", "transformers VLM reasoner (Qwen2-VL, Qwen2.5-VL): K = tokens")
POLICIES.add(
    "diffusion",
    "mmgrpo.policies.diffusion:DiffusionPolicy",
    "diffusion/flow sampler as an SDE policy over a family adapter (K = sampling steps)",
)
