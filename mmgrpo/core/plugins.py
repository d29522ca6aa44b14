"""Where every kind of part comes from: the library's own modules, entry points, dotted paths.

A :class:`~mmgrpo.core.registry.Registry` of kind K is filled lazily, on its first lookup, in this order:

1. the built-in modules of K listed in :data:`BUILTIN` (importing one registers its parts, as a plug-in would);
2. the entry points of the group ``mmgrpo.<K>`` (:data:`ENTRY_POINT_GROUPS`) of every installed distribution: an
   entry point naming a module registers by being imported, one naming an object (``pkg.mod:obj``) is registered
   under the entry point's name;
3. at lookup, a dotted path ``my_pkg.my_module.my_part`` names an object directly.

:data:`BUILTIN` is the library's own entry-point table. It names modules as strings on purpose: recipes and paper
methods sit above the layers whose registries they fill (docs/architecture.md), so nothing below may import them,
exactly as nothing in mmgrpo imports a third-party plug-in.
"""

from __future__ import annotations

BUILTIN: dict[str, tuple[str, ...]] = {
    "estimators": ("mmgrpo.core.advantages",),
    "losses": ("mmgrpo.core.losses",),
    "diffusion_families": (
        "mmgrpo.policies.models.sd3",
        "mmgrpo.policies.models.flux",
        "mmgrpo.policies.models.wan",
        "mmgrpo.policies.models.hunyuan_video",
        "mmgrpo.policies.models.sd",
    ),
    "rewards": (
        "mmgrpo.rewards.bandit",
        "mmgrpo.rewards.shapes",
        "mmgrpo.rewards.remote",
        "mmgrpo.rewards.text",
        "mmgrpo.rewards.jpeg",
        "mmgrpo.rewards.image",
        "mmgrpo.rewards.similarity",
        "mmgrpo.rewards.video",
        "mmgrpo.rewards.curriculum",
        "mmgrpo.rewards.consensus",
        "mmgrpo.rewards.listener",
        "mmgrpo.rewards.vlm_listener",
        "mmgrpo.methods.acre",
        "mmgrpo.methods.pearl",
    ),
    "pipelines": (
        "mmgrpo.pipelines.bandit",
        "mmgrpo.pipelines.text_to_image",
        "mmgrpo.pipelines.vlm_reasoning",
        "mmgrpo.pipelines.vlm_grounding",
        "mmgrpo.pipelines.text_to_video",
        "mmgrpo.pipelines.image_to_video",
    ),
    "vlm_families": (),
    "methods": (),
    "diffusion_objectives": ("mmgrpo.policies.objectives", "mmgrpo.policies.flow_matching"),
    "exploration": ("mmgrpo.policies.exploration",),
}
"""kind -> modules whose import registers the library's own parts of that kind"""

ENTRY_POINT_GROUPS: dict[str, str] = {kind: f"mmgrpo.{kind}" for kind in BUILTIN}
"""kind -> the entry-point group third-party distributions publish parts of that kind under"""
