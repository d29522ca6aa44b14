"""VLM model families: what differs between vision-language models, behind one protocol (:class:`VLMFamily`).

The VLM policy (:mod:`mmgrpo.policies.vlm`) and its scorer (:mod:`mmgrpo.policies.vlm_scorer`) are written once for
every family; a family says only how ITS model is put together, as diffusion's ``mmgrpo/policies/models/<family>.py``
adapters do for generators:

- which transformers class loads it, and where its decoder, vision tower and cache argument are;
- the positions of a prompt (1-D, or Qwen's M-RoPE 3-D positions from ``get_rope_index``) and of the completion
  tokens that follow it;
- the vision features of a prompt's images / video and how they enter the decoder (scattered into the embeddings;
  Qwen3-VL also adds "deepstack" features to the first decoder layers' hidden states);
- how the processor is told a video's frame rate, and the box coordinate convention the model writes
  (``mmgrpo/rewards/boxes.py``).

Families are registered in :data:`VLM_FAMILIES` (kind ``vlm_families``: built-ins, entry points of the group
``mmgrpo.vlm_families``, or a dotted path); the policy picks one from the model config's ``model_type`` unless
``policy.options.family`` names one. Shapes: Lp prompt tokens, r rows of one prompt, L sequence slots, D hidden.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.policies.vlm_inputs import PromptInputs


class VLMFamily(Protocol):
    """What a VLM family provides; :class:`~mmgrpo.policies.vlm_families.generic.GenericFamily` is the default."""

    name: str
    box_convention: str  # a mmgrpo/rewards/boxes.py convention: qwen2_vl (0..1000 grid), qwen2_5_vl, absolute

    def model_class(self) -> type:
        """The transformers class ``from_pretrained`` loads (e.g. Qwen2VLForConditionalGeneration)."""
        ...

    def backbone(self, hf: nn.Module) -> nn.Module:
        """The text decoder: takes ``inputs_embeds``, ``position_ids``, the cache; returns ``last_hidden_state``."""
        ...

    def vision_tower(self, hf: nn.Module) -> nn.Module | None:
        """The vision encoder (frozen under LoRA, so its features are cached across calls), or None."""
        ...

    def cache_kwarg(self, backbone: nn.Module) -> str:
        """Name of the decoder's KV-cache argument (``cache`` in transformers >= 5.x, else ``past_key_values``)."""
        ...

    def video_kwargs(self, num_frames: int, fps: float) -> dict[str, Any]:
        """Extra processor arguments for a video of ``num_frames`` frames read at ``fps`` (temporal positions)."""
        ...

    def prompt_positions(
        self, hf: nn.Module, ids: torch.Tensor, token_types: torch.Tensor | None, vision: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """Positions [P, Lp] of a prompt's tokens and the position of the first completion token."""
        ...

    def expand_positions(self, full: torch.Tensor, rows: int) -> torch.Tensor:
        """Positions [P, L] of one row -> the decoder's ``position_ids`` for ``rows`` rows ([P, r, L] or [r, L])."""
        ...

    def vision_features(self, hf: nn.Module, prompt: PromptInputs, kind: str) -> dict[str, torch.Tensor]:
        """One vision pass over the prompt's ``kind`` ("image" / "video") media: ``{kind: [n_tok, D], ...}`` (extra
        entries named ``kind + "_..."`` are the family's, e.g. deepstack features); ``{}`` without such media."""
        ...

    def decoder_kwargs(
        self, hf: nn.Module, prompt: PromptInputs, feats: dict[str, torch.Tensor], rows: int, start: int, length: int
    ) -> dict[str, Any]:
        """Extra decoder arguments for a forward over sequence slots [start, start + length) of ``rows`` rows."""
        ...


VLM_FAMILIES: Registry[Any] = Registry("VLM family", plugins="vlm_families")
"""name -> family class (instantiated without arguments); names match transformers' ``config.model_type``"""


def resolve_family(config: Any, name: str = "auto", key: str = "policy.options.family") -> VLMFamily:
    """The family of a model config: ``name`` if given, else the family registered under ``config.model_type``,
    else ``generic`` (any ``AutoModelForImageTextToText`` whose ``get_image_features`` returns projected features)."""
    if name != "auto":
        if name not in VLM_FAMILIES and "." not in name:
            hint = "use auto (the family of config.model_type) or a registered family"
            raise UserError(f"{key}={name!r}: {hint}. {VLM_FAMILIES.unknown_message(name)}")
        return VLM_FAMILIES.get(name)()
    model_type = getattr(config, "model_type", "") or ""
    return VLM_FAMILIES.get(model_type if model_type in VLM_FAMILIES else "generic")()
