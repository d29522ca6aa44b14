"""What a VLM policy scores beyond its own log-probs: frozen VLMs beside it, and its own internal state.

A mixin of :class:`~mmgrpo.policies.vlm.VLMPolicy` (it reads the policy's options, tokenizer, family adapter, scorer
and prepared prompts): a frozen teacher loaded like the policy (:meth:`ExtraScoring.load_frozen`) and its token
log-probs of the rollout's completions (:meth:`ExtraScoring.frozen_log_prob`: KDRL, SRPO's self-teacher), the mean
log-likelihood of given texts (:meth:`ExtraScoring.mean_logprob`: AMPO), and value features of rows
(:meth:`ExtraScoring.value_features`: POISE).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel
from mmgrpo.core.types import Rollout
from mmgrpo.policies.vlm_inputs import PromptInputs
from mmgrpo.policies.vlm_load import detect_family, load_vlm
from mmgrpo.policies.vlm_scorer import VLMScorer


class ExtraScoring:
    """Scoring by frozen VLMs and of the policy's internal state (mixed into ``VLMPolicy``)."""

    @torch.no_grad()
    def value_features(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """The policy's internal state of ``rows`` [n] as features [n, 2 D + 5] (fp32, CPU, no gradient), for value
        probes (POISE): the final hidden state at the prompt's last token, the mean final hidden state over the
        row's completion slots, then token-entropy statistics of the sampled tokens (mean, std, max, min) and
        log(1 + completion length). One teacher-forced forward of each prompt's rows at the current parameters."""
        rows_l = [int(r) for r in rows.reshape(-1).tolist()]
        comp = rollout.extras["completion_ids"][rows_l]  # [n, K]
        lengths = rollout.extras["completion_len"][rows_l].to(comp.device).clamp_min(1)  # [n]
        L = max(int(lengths.max()), 1)
        sc = self._scorer()
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows_l):
            groups.setdefault(id(rollout.extras["prompt"][r]), []).append(i)
        D = sc.hf.get_input_embeddings().weight.shape[1]
        hid = torch.zeros(len(rows_l), 2 * D)

        def hidden() -> None:  # run as the wrapped model's forward (FSDP: its hooks gather the shards)
            for idx in groups.values():
                prompt = rollout.extras["prompt"][rows_l[idx[0]]]
                h = sc.group_hidden(sc.hf, prompt, comp[idx, :L], cached=True).float()
                slots = (torch.arange(L, device=h.device)[None] < lengths[idx][:, None]).float()  # [r, L]
                traj = (h * slots[..., None]).sum(1) / slots.sum(1, keepdim=True)  # [r, D]
                hid[idx] = torch.cat([h[:, 0], traj], dim=-1).cpu()

        self.model(run=hidden)
        ent = rollout.extras["token_entropy"][rows_l].float().cpu()  # [n, K]
        valid = torch.arange(ent.shape[1])[None] < lengths.cpu()[:, None]  # [n, K]
        cnt = valid.sum(1).clamp_min(1).float()
        mean = (ent * valid).sum(1) / cnt
        std = (((ent - mean[:, None]) ** 2) * valid).sum(1).div(cnt).sqrt()
        mx = ent.masked_fill(~valid, float("-inf")).amax(1)
        mn = ent.masked_fill(~valid, float("inf")).amin(1)
        stats = torch.stack([mean, std, mx, mn, torch.log1p(lengths.cpu().float())], dim=1)  # [n, 5]
        return torch.cat([hid, stats], dim=1)

    @torch.no_grad()
    def mean_logprob(self, prompt: Any, meta: dict, texts: list[str]) -> torch.Tensor:
        """Length-normalised log-likelihood of each text (then EOS) as the completion of ``prompt`` under the policy
        (mean token log-prob, no gradient): [c] fp32 on CPU. How well the student "comprehends" a given solution."""
        p = self.prepare(prompt, meta)
        ids = [self._forced_ids(t) for t in texts]
        L = max(len(i) for i in ids)
        comp = torch.full((len(ids), L), self.pad_id, dtype=torch.long, device=self.device)
        for j, i in enumerate(ids):
            comp[j, : len(i)] = torch.tensor(i, device=self.device)
        logp, _ = self.model([p] * len(ids), comp, reuse_features=False)  # [c, L]
        lens = torch.tensor([len(i) for i in ids], device=logp.device)
        valid = torch.arange(L, device=logp.device)[None] < lens[:, None]
        return (torch.where(valid, logp.float(), 0.0).sum(1) / lens).cpu()

    def load_frozen(
        self, name: str, path: str, key: str, dtype: str | None = None, revision: str | None = None
    ) -> ExtraModel:
        """A frozen VLM (a teacher) loaded like the policy (:func:`load_vlm`: local folder or hub id, safetensors,
        ``dtype`` default the policy's), on the policy's device, scoring tokens exactly as the policy does (same
        temperature, suppressed ids, chunking): an :class:`~mmgrpo.core.extra.ExtraModel` whose ``handle`` is its
        :class:`VLMScorer`. It reads the policy's prepared prompts, so it must share the policy's tokenizer and
        family (a UserError naming ``key`` otherwise)."""
        o = copy.copy(self.options)
        o.path, o.dtype, o.revision, o.variant = path, dtype or self.options.dtype, revision, None
        model, processor = load_vlm(path, o, key)
        tok = getattr(processor, "tokenizer", processor)
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise UserError(
                f"{key}={path}: its tokenizer differs from the policy's ({len(tok.get_vocab())} vs "
                f"{len(self.tokenizer.get_vocab())} tokens or different ids); a teacher scores the policy's sampled "
                "token ids, so it needs the same tokenizer (a model of the same family and vocabulary)"
            )
        family = detect_family(model, "auto")
        if family.name != self.adapter.name:
            raise UserError(
                f"{key}={path}: a {family.name} model, but the policy is {self.adapter.name}; a teacher reads the "
                "policy's prepared prompts (positions, vision inputs), so it must be of the policy's family"
            )
        sc = self._scorer()
        scorer = VLMScorer(model, self.adapter, sc.suppress.clone(), sc.temperature, sc.chunk,
                           shared_prefix=sc.shared_prefix)  # fmt: skip
        scorer.to(self.device)
        return ExtraModel(name, scorer, scorer)

    @torch.no_grad()
    def frozen_log_prob(
        self, extra: ExtraModel, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None,
        prompts: list[PromptInputs] | None = None, with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Token log-probs [n, k] (fp32, no gradient) of the rollout's completions ``rows`` [n] at ``units`` [k]
        under a frozen scorer (``extra.handle``, e.g. :meth:`load_frozen`'s teacher), time counted in ``extra``.

        ``prompts``: n prepared prompts to condition on instead of the rollout's (:meth:`prepare` of another text,
        e.g. the question with its ground truth: a self-teacher); ``extra.handle`` may be the policy's own scorer.
        Vision features are recomputed by that scorer (never the policy's cached ones). ``with_entropy``: also the
        entropy [n, k] of the scorer's distribution at each token (how sure the teacher is), as a tuple.

        ``units`` None: all K columns, scored up to the longest completion of these rows (0 after it: padding, which
        no loss reads), so a teacher does not forward ``max_new_tokens`` positions for short answers."""
        rows_l = [int(r) for r in rows.reshape(-1).tolist()]
        comp = rollout.extras["completion_ids"][rows_l]  # [n, K]
        K, to = comp.shape[1], rollout.logp_old.device
        if units is None:
            L = max(int(rollout.extras["completion_len"][rows_l].max()) if rows_l else 1, 1)
            cols = None
        else:
            units = units.reshape(-1).cpu()
            L = max(int(units.max()) + 1 if units.numel() else 1, 1)
            cols = units.to(self.device)

        def pick(t: torch.Tensor) -> torch.Tensor:  # [n, L] -> [n, k] on logp_old's device
            return (F.pad(t, (0, K - t.shape[1])) if cols is None else t[:, cols]).float().to(to)

        prompts = prompts if prompts is not None else [rollout.extras["prompt"][i] for i in rows_l]
        scorer = getattr(extra.handle, "module", extra.handle)
        with extra.timed():
            if with_entropy:  # run as the handle's forward: a wrapper's hooks run too (FSDP2 gathers the root shards)
                run = lambda: scorer.rows_logprobs_entropy(prompts, comp[:, :L].to(self.device))  # noqa: E731
                logp, ent = extra.handle(run=run)
                return pick(logp), pick(ent)
            logp, _ = scorer(prompts, comp[:, :L].to(self.device), reuse_features=False)
        return pick(logp)
