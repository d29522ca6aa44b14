"""Exponential moving average of the trainable parameters (used for evaluation when enabled)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mmgrpo.core.errors import UserError


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param at each ``update()``; fp32 shadows. ``option`` names the
    config key in errors (the trainer's evaluation EMA, or a diffusion policy's sampling policy)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, option: str = "trainer.ema_decay"):
        if not 0.0 < decay < 1.0:
            raise UserError(f"{option} must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def swapped(self):
        """Temporarily load the EMA weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [t.clone().float() for t in state["shadow"]]
