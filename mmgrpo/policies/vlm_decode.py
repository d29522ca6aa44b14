"""The VLM sampler's engine: B prompts' prefills joined into one cache of B*G rows and one decode loop over them.

:meth:`mmgrpo.policies.vlm.VLMPolicy.sample_batch` builds a :class:`Decoder` from its scorer, family adapter,
sampling options and special ids, and runs :meth:`Decoder.run` as the (wrapped) model's forward; what it does is
described there. The cache join is :mod:`mmgrpo.policies.vlm_cache`, the per-token sampling
:func:`mmgrpo.policies.vlm_scorer.sample_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.policies.vlm_cache import join_caches
from mmgrpo.policies.vlm_families import VLMFamily
from mmgrpo.policies.vlm_inputs import PromptInputs
from mmgrpo.policies.vlm_scorer import VLMScorer, sample_rows


@dataclass(frozen=True)
class Decoder:
    """What the decode loop reads of the policy: its scorer (the model's pieces, suppressed ids, and ``any_process``
    under collective forwards), family adapter, sampling options and special ids."""

    scorer: VLMScorer
    family: VLMFamily
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    pad_id: int
    eos_ids: list[int]

    def run(self, prompts: list[PromptInputs], G: int, generators: list, greedy: bool):
        """-> (tokens [N, T] with pad after EOS, lengths [N] incl. EOS, has_eos [N] bool, entropy [N, T] fp32)."""
        sc = self.scorer
        hf = sc.hf
        backbone = sc.backbone(hf)
        caches, last = [], []
        for prompt in prompts:
            feats = sc.vision(hf, prompt, store=True)  # the vision tower's one pass
            emb = sc.prompt_embeds(hf, prompt, feats)[None]  # [1, Lp, D]
            extra = self.family.decoder_kwargs(hf, prompt, feats, 1, 0, emb.shape[1])  # e.g. deepstack features
            out = backbone(inputs_embeds=emb, position_ids=sc.positions(prompt, 0, 1), use_cache=True, **extra)
            caches.append(getattr(out, "cache", None) or out.past_key_values)
            last.append(out.last_hidden_state[:, -1])  # [1, D]
        lengths = [int(p.input_ids.shape[0]) for p in prompts]
        joined = join_caches(caches, lengths, G, room=self.max_new_tokens)
        if joined is not None:
            return self.loop(prompts, joined, torch.cat(last), G, generators, greedy)
        # a cache layout join_caches does not know (e.g. sliding windows): one decode loop per prompt
        parts = [
            self.loop([p], join_caches([c], [n], G, room=self.max_new_tokens), h, G, [g], greedy)
            for p, c, n, h, g in zip(prompts, caches, lengths, last, generators)
        ]
        T = max(part[0].shape[1] for part in parts)
        toks = torch.cat([nn.functional.pad(x[0], (0, T - x[0].shape[1]), value=self.pad_id) for x in parts])
        ent = torch.cat([nn.functional.pad(x[3], (0, T - x[3].shape[1])) for x in parts])
        return toks, torch.cat([x[1] for x in parts]), torch.cat([x[2] for x in parts]), ent

    def loop(self, prompts, cache, last: torch.Tensor, G: int, generators, greedy: bool):
        """The decode loop over a joined cache of B*G rows; ``last [B, D]`` is each prompt's last prefill hidden
        state."""
        sc = self.scorer
        hf = sc.hf
        backbone, head, embed = sc.backbone(hf), hf.get_output_embeddings(), hf.get_input_embeddings()
        B, dev = len(prompts), last.device
        N, K = B * G, self.max_new_tokens
        lengths = torch.tensor([p.input_ids.shape[0] for p in prompts], device=dev)  # [B]
        pad = (lengths.max() - lengths).repeat_interleave(G)  # [N] left pad slots of each row
        Lmax, mask = int(lengths.max()), None
        if bool(pad.any()):  # [N, Lmax + K]: 0 on the pad slots, which no row may attend to
            mask = (torch.arange(Lmax + K, device=dev)[None] >= pad[:, None]).long()
        # positions of completion token t of each row (slot Lp_b + t), the rows' own prompts': [..., N, K]
        positions = torch.cat([sc.positions(p, K, G, start=p.input_ids.shape[0]) for p in prompts], dim=-2)
        h = last.repeat_interleave(G, dim=0)  # [N, D]
        eos = torch.tensor(self.eos_ids, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        kw = {self.family.cache_kwarg(backbone): cache}
        tokens, entropy = [], []
        finished = [False] * B  # prompts all of whose rows have their EOS
        for t in range(K):
            logits = head(h)  # [N, V]
            # prompt b's rows draw from its own generator (layout-independent draws), only while it is decoding
            groups = [(slice(b * G, (b + 1) * G), generators[b]) for b in range(B) if not (greedy or finished[b])]
            nxt, ent = sample_rows(logits, groups, self.temperature, self.top_p, self.top_k, sc.suppress, greedy)
            entropy.append(ent)  # [N]; zeroed after each row's EOS below
            nxt = nxt.masked_fill(done, self.pad_id)
            tokens.append(nxt)
            done = done | torch.isin(nxt, eos)
            finished = done.view(B, G).all(1).tolist()  # the loop's one device -> host copy a token
            if t == K - 1 or not self.on_any_process(not all(finished)):  # every process runs as many forwards
                break
            pos = positions[..., t : t + 1]  # token t sits at slot Lp_b + t (joined: slot Lmax + t)
            seen = None if mask is None else mask[:, : Lmax + t + 1]
            out = backbone(inputs_embeds=embed(nxt)[:, None], position_ids=pos, attention_mask=seen, use_cache=True,
                           **kw)  # fmt: skip
            h = out.last_hidden_state[:, -1]
        toks = torch.stack(tokens, dim=1)  # [N, T]
        is_eos = torch.isin(toks, eos)  # [N, T]
        has_eos = is_eos.any(1)  # [N]
        lens = torch.where(has_eos, is_eos.long().argmax(1) + 1, toks.shape[1])  # [N]: up to the first EOS
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # [N, T]: an EOS earlier in the row (it was done)
        ent = torch.stack(entropy, dim=1)  # [N, T]
        if not bool(ent.isfinite().all()):  # one check a rollout (torch.multinomial's was one a prompt and token)
            t = int((~ent.isfinite()).any(0).long().argmax())
            raise UserError(
                f"the policy's next-token distribution was not finite at completion token {t} of the rollout (NaN or "
                "inf logits): the model's weights, inputs or activations hold non-finite values (an fp16 overflow: "
                "use trainer.mixed_precision=bf16; a diverged run: continue from its last checkpoint, whose weights "
                "were finite, with a lower trainer.lr)"
            )
        return toks, lens, has_eos, ent.masked_fill(after, 0.0)

    def on_any_process(self, flag: bool) -> bool:
        """``flag`` here, or on any process when the forwards are collective (the scorer's ``any_process``)."""
        return flag if self.scorer.any_process is None else self.scorer.any_process(flag)
