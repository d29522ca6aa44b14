"""One self-contained adapter per model family (see ``mmgrpo.policies.diffusion.DiffusionAdapter``)."""

from mmgrpo.core.dtypes import resolve_dtype

__all__ = ["resolve_dtype"]
