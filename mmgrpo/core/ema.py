"""Exponential moving average of the trainable parameters (used for evaluation when enabled)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mmgrpo.core.errors import UserError


class EMA:
    """shadow <- d * shadow + (1 - d) * param at each ``update()``; fp32 shadows. ``option`` names the config key in
    errors (the trainer's evaluation EMA, or a diffusion policy's sampling policy).

    By default d = ``decay`` at every call. Flow-GRPO's evaluation EMA (``flow_grpo/ema.py``, ``EMAModuleWrapper``,
    decay 0.9, ``update_step_interval`` 8) adds two things, both counted in calls n = 1, 2, ... (one a finished
    optimizer step, as their ``global_step`` is when they call it):

    - ``every``: the shadow moves only at calls with (n + 1) % every == 0 (every 8: calls 7, 15, 23, ...);
    - ``warmup``: d = min(decay, (1 + n) / (10 + n)), so early shadows follow the parameters closely
      (n = 7: 8/17 = 0.47) instead of holding on to the initial weights.

    The call count is part of the state, so a resumed run moves its shadow at the same steps.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        decay: float,
        option: str = "trainer.ema_decay",
        *,
        warmup: bool = False,
        every: int = 1,
    ):
        if not 0.0 < decay < 1.0:
            raise UserError(f"{option} must be in (0, 1), got {decay}")
        if every < 1:
            raise UserError(f"the EMA of {option} moves every {every} steps; it must be >= 1")
        self.params = list(params)
        self.decay = decay
        self.warmup, self.every, self.calls = warmup, every, 0
        self.shadow = [p.detach().clone().float() for p in self.params]

    def current_decay(self) -> float | None:
        """d of the latest call to :meth:`update`, or None when that call left the shadow alone (``every``)."""
        n = self.calls
        if (n + 1) % self.every:
            return None
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        self.calls += 1
        d = self.current_decay()
        if d is None:
            return
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)

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
        return {"decay": self.decay, "calls": self.calls, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        # on each parameter's device: a checkpoint is read onto the host, the parameters may be on a GPU
        self.shadow = [t.to(p.device).clone().float() for t, p in zip(state["shadow"], self.params, strict=True)]
        self.calls = int(state.get("calls", 0))  # a checkpoint of before 2026-12-06 has no count
