"""Where every kind of part comes from: the library's own modules, entry points, dotted paths.

A :class:`~mmgrpo.core.registry.Registry` of kind K is filled lazily, on its first lookup, in this order:

1. the built-in modules of K listed in :data:`BUILTIN` (importing one registers its parts, as a plug-in would);
2. the entry points of the group ``mmgrpo.<K>`` (:data:`ENTRY_POINT_GROUPS`) of every installed distribution: an
   entry point naming a module registers by being imported, one naming an object (``pkg.mod:obj``) is registered
   under the entry point's name;
3. at lookup, a dotted path ``my_pkg.my_module.my_part`` names an object directly.

:data:`BUILTIN` is the library's own entry-point table. It names modules as strings on purpose: recipes and paper
methods sit above the layers whose registries they fill (docs/architecture.md), so nothing below may import them,
exactly as nothing in mmgrpo imports a third-party plug-in. Its keys are the kinds ``mmgrpo list`` shows: each kind's
registry is found through :func:`mmgrpo.core.registry.registries`, the index of registries created with
``plugins=``, so a new kind needs a registry created with ``plugins="<kind>"`` and a key here.
"""

from __future__ import annotations

BUILTIN: dict[str, tuple[str, ...]] = {
    "estimators": ("mmgrpo.core.advantages", "mmgrpo.methods.spo", "mmgrpo.methods.beyond_variance"),
    "samplers": (
        "mmgrpo.core.sampling",
        "mmgrpo.methods.spo",
        "mmgrpo.methods.gdro",
        "mmgrpo.methods.beyond_variance",
        "mmgrpo.methods.vspo",
    ),
    "shaping": ("mmgrpo.core.advantages",),
    "combine": ("mmgrpo.core.advantages",),
    "losses": ("mmgrpo.core.losses",),
    "aggregations": ("mmgrpo.core.losses",),
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
        "mmgrpo.methods.medloc",
        "mmgrpo.methods.mmupt",
        "mmgrpo.methods.listener",
        "mmgrpo.methods.acre",
        "mmgrpo.methods.pearl",
        "mmgrpo.methods.egrpo",
        "mmgrpo.methods.vspo",
    ),
    "pipelines": (
        "mmgrpo.pipelines.bandit",
        "mmgrpo.pipelines.text_to_image",
        "mmgrpo.pipelines.vlm_reasoning",
        "mmgrpo.pipelines.vlm_grounding",
        "mmgrpo.pipelines.text_to_video",
        "mmgrpo.pipelines.image_to_video",
    ),
    "vlm_families": (
        "mmgrpo.policies.vlm_families.generic",
        "mmgrpo.policies.vlm_families.qwen2_vl",
        "mmgrpo.policies.vlm_families.qwen2_5_vl",
        "mmgrpo.policies.vlm_families.qwen3_vl",
    ),
    "methods": (
        "mmgrpo.methods.pearl",
        "mmgrpo.methods.tempsamp",
        "mmgrpo.methods.acre",
        "mmgrpo.methods.listener",
        "mmgrpo.methods.medloc",
        "mmgrpo.methods.mmupt",
        "mmgrpo.methods.egrpo",
        "mmgrpo.methods.strata",
        "mmgrpo.methods.dynamic_weights",
        "mmgrpo.methods.microcoder",
        "mmgrpo.methods.dagrpo",
        "mmgrpo.methods.kdrl",
        "mmgrpo.methods.nft",
        "mmgrpo.methods.poise",
        "mmgrpo.methods.srpo",
        "mmgrpo.methods.ampo",
        "mmgrpo.methods.scaf_grpo",
        "mmgrpo.methods.hill",
        "mmgrpo.methods.cog_drift",
    ),
    "rewriters": (
        "mmgrpo.core.rewriting",
        "mmgrpo.methods.scaf_grpo",
        "mmgrpo.methods.hill",
        "mmgrpo.methods.cog_drift",
    ),
    "diffusion_objectives": ("mmgrpo.policies.objectives", "mmgrpo.policies.flow_matching"),
    "exploration": ("mmgrpo.policies.exploration",),
    "sde": ("mmgrpo.policies.sde",),
}
"""kind -> modules whose import registers the library's own parts of that kind"""

ENTRY_POINT_GROUPS: dict[str, str] = {kind: f"mmgrpo.{kind}" for kind in BUILTIN}
"""kind -> the entry-point group third-party distributions publish parts of that kind under"""
