"""The reference policy: a tabular categorical bandit.

Each prompt p has A arms; the policy is a table of logits [P, A]; one sample is one arm (K = 1 action
unit per row). It is the smallest thing the whole loop runs on, so the trainer, estimators, losses,
checkpoints and distributed runs are tested on it without any model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmgrpo.core.errors import bad_option
from mmgrpo.core.losses import k3_kl
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout, rollout_by_size


@dataclass
class BanditPolicyOptions:
    init_std: float = 0.0
    """std of the random initial logits (0 = uniform policy)"""
    reference: bool = True
    """keep the initial logits as a frozen reference for the KL term"""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise bad_option(
                "policy.options.init_std",
                self.init_std,
                "the std of the random initial logits must be a finite number >= 0; set it to 0 (uniform) or e.g. 0.1",
            )


class BanditModel(nn.Module):
    def __init__(self, num_prompts: int, num_arms: int, init_std: float = 0.0, seed: int = 0):
        super().__init__()
        g = generator_for(seed)
        self.logits = nn.Parameter(torch.randn(num_prompts, num_arms, generator=g) * init_std)

    def forward(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """prompt_ids [n] -> log-probs over arms [n, A] (fp32)."""
        return torch.log_softmax(self.logits[prompt_ids].float(), dim=-1)


class BanditPolicy:
    """Policy protocol over :class:`BanditModel`. Samples: LongTensor [N] of chosen arms."""

    def __init__(self, num_prompts: int, num_arms: int, options: BanditPolicyOptions | None = None, seed: int = 0):
        options = options or BanditPolicyOptions()
        self.model: nn.Module = BanditModel(num_prompts, num_arms, options.init_std, seed)
        self.ref_logits = self.model.logits.detach().clone() if options.reference else None

    @torch.no_grad()
    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        """G arms per prompt (``batch.group_sizes[b]`` for prompt b when given: ragged groups)."""
        if batch.ragged(group_size):
            return rollout_by_size(self.rollout, batch, group_size, generator)
        G = batch.sizes(group_size)[0] if len(batch) else group_size
        ids = torch.tensor([int(p) for p in batch.prompts], dtype=torch.long)  # [B]
        logp_all = self._unwrapped()(ids).cpu()  # [B, A] on the host: the prompts' generators are CPU generators
        arms = []
        for b in range(len(batch)):
            g = generator_for(batch.seeds[b]) if batch.seeds else generator
            arms.append(torch.multinomial(logp_all[b].exp(), G, replacement=True, generator=g))
        arms_t = torch.stack(arms).reshape(-1)  # [N]
        ids_n = ids.repeat_interleave(G)  # [N]
        logp_old = logp_all.repeat_interleave(G, dim=0).gather(1, arms_t[:, None])  # [N, 1]
        return Rollout(
            samples=arms_t,
            logp_old=logp_old.float(),
            train_mask=torch.ones_like(logp_old, dtype=torch.bool),
            group_size=G,
            prompts=[p for p in batch.prompts for _ in range(G)],
            meta=[m for m in batch.meta for _ in range(G)],
            extras={"prompt_ids": ids_n, "arms": arms_t},
            group_keys=ids_n.tolist(),  # stratum = prompt (for the stratified estimator)
        )

    def log_prob(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None) -> LogProbs:
        ids = rollout.extras["prompt_ids"][rows]
        arms = rollout.extras["arms"][rows]
        lp_all = self.model(ids)  # [n, A], through the (DDP) wrapper, on the model's device
        logp = lp_all.gather(1, arms[:, None].to(lp_all.device))  # [n, 1]
        kl = None
        if self.ref_logits is not None:
            ref = torch.log_softmax(self.ref_logits[ids], dim=-1).gather(1, arms[:, None])
            kl = k3_kl(logp, ref.to(logp.device))
        to = rollout.logp_old.device  # the loss meets logp_old and the advantages there (autograd crosses devices)
        return LogProbs(logp=logp.to(to), kl=None if kl is None else kl.to(to))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _unwrapped(self) -> BanditModel:
        return getattr(self.model, "module", self.model)

    def probs(self) -> torch.Tensor:
        """[P, A] current arm probabilities (on the host)."""
        return torch.softmax(self._unwrapped().logits.detach().float(), dim=-1).cpu()
