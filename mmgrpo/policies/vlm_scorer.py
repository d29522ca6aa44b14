"""The VLM scorer: teacher-forced token log-probs of completions given their prompts, for every VLM family.

:class:`VLMScorer` is the trainable module the trainer wraps (``forward(prompts, completions [n, L]) -> (logp [n, L],
ref_logp [n, L] | None)``); the sampler of :class:`~mmgrpo.policies.vlm.VLMPolicy` reuses its pieces (prompt
embeddings, decoder, head). What differs between model families (positions, vision features, deepstack...) is asked
of the policy's :class:`~mmgrpo.policies.vlm_families.VLMFamily`; the maths here is the same for all of them:

- :func:`chunked_token_logprobs`: log softmax(logits / temperature)[targets] in fp32, a chunk of tokens at a time;
- :func:`sample_tokens`: one token per row with suppressed ids, temperature, top-k and top-p;
- :func:`token_entropy`: the entropy of the distribution the log-probs are of, from logits the sampler already has;
- :func:`sample_rows`: both for every row of a decode step at once (what the decode loop calls).

Shapes: n rows, r rows of one prompt, Lp prompt tokens, Lc completion tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmgrpo.core.errors import UserError
from mmgrpo.policies.vlm_families import VLMFamily
from mmgrpo.policies.vlm_inputs import PromptInputs

# ---------------------------------------------------------------------------------------------- pure maths


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk: int = 1024,
    temperature: float = 1.0,
    suppress: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[targets] in fp32, ``chunk`` tokens at a time. [n, L, D] -> [n, L].

    ``suppress [V]`` (bool) removes tokens from the distribution (logit -inf). Each chunk's [chunk, V] fp32 logits
    are freed after use and recomputed in backward (activation checkpointing), so peak memory is one chunk.
    """
    n, L, D = hidden.shape
    flat_h, flat_t = hidden.reshape(n * L, D), targets.reshape(n * L)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float() / temperature  # [c, V] fp32: the ratio exp(logp - logp_old) needs fp32
        if suppress is not None:
            logits = logits.masked_fill(suppress[: logits.shape[-1]], float("-inf"))
        return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [c]

    out = []
    for lo in range(0, n * L, max(1, chunk)):
        h, t = flat_h[lo : lo + chunk], flat_t[lo : lo + chunk]
        out.append(checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return torch.cat(out).reshape(n, L) if out else hidden.new_zeros(n, L, dtype=torch.float32)


def token_entropy(
    logits: torch.Tensor, temperature: float = 1.0, suppress: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) with ``suppress [V]`` ids removed, per row, in fp32.
    [..., V] -> [...].

    The distribution is the one :func:`chunked_token_logprobs` scores (top-k / top-p truncation is not reflected,
    as in TRL's and verl's ``entropy``): H = -sum_v p_v log p_v, with 0 log 0 = 0 for suppressed ids.
    """
    z = logits.float() / temperature
    if suppress is not None:
        z = z.masked_fill(suppress[: z.shape[-1]], float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def sample_tokens(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress: torch.Tensor | None = None,
    greedy: bool = False,
) -> torch.Tensor:
    """One token per row from logits [G, V] (fp32): suppressed ids -> -inf, temperature, top-k, top-p. -> [G].
    :func:`sample_rows` with every row drawn from ``generator``."""
    return sample_rows(logits, [(slice(None), generator)], temperature, top_p, top_k, suppress, greedy)[0]


def sample_rows(
    logits: torch.Tensor,
    groups: list[tuple[slice, torch.Generator | None]],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of all rows: (tokens [N], entropy [N] fp32), the same values as :func:`token_entropy` of
    ``logits`` and :func:`sample_tokens` of each group's rows from that group's generator (bit for bit), with the
    shared work done once: the fp32 logits, suppression and temperature, and the softmax, over all N rows at once.

    ``groups``: (rows, generator) of each prompt still decoding; rows in no group get token 0 (the caller pads
    them). Fewer ops a token than calling the two functions per prompt (the decode loop's Python and kernel-launch
    overhead is per op, not per row).
    """
    z = logits.float()
    if suppress is not None:
        z = z.masked_fill(suppress[: z.shape[-1]], float("-inf"))
    zt = z / temperature
    logp = torch.log_softmax(zt, dim=-1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    if greedy:
        return z.argmax(-1), entropy
    if not groups:
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device), entropy
    if top_k > 0:
        kth = torch.topk(zt, min(top_k, zt.shape[-1]), dim=-1).values[:, -1:]  # [N, 1]
        zt = zt.masked_fill(zt < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(zt, descending=True, dim=-1)  # [N, V]
        sp = torch.softmax(sorted_logits, -1)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest prefix whose mass reaches top_p
        zt = zt.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(zt, -1)
    # torch.multinomial(probs[rows], 1, generator) of every group at once, bit for bit: its algorithm for one sample
    # is argmax(p / q), q ~ Exp(1) drawn from the generator in the rows' order (the same tokens and generator
    # states); without its check of p, whose .item() waited for the device once per prompt and token. A row in no
    # group keeps q = inf: p / q = 0 everywhere, token 0.
    q = torch.full_like(probs, float("inf"))
    for rows, generator in groups:
        q[rows].exponential_(1, generator=generator)
    return (probs / q).argmax(-1), entropy


def checkpointed(module: nn.Module) -> bool:
    """Whether a layer of ``module`` recomputes itself in backward (transformers' gradient checkpointing): such
    layers drop the KV cache while training, so the shared-prefix forward cannot run through them."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


# ---------------------------------------------------------------------------------------------- the module


class VLMScorer(nn.Module):
    """The trainable module the trainer wraps: token log-probs of completions given their prompts.

    ``forward(prompts, completions [n, L]) -> (logp [n, L], ref_logp [n, L] | None)``: rows of one prompt share
    one forward and one vision pass. Also holds the pieces the sampler reuses (prompt embeddings, backbone, head).
    """

    def __init__(
        self,
        vlm: nn.Module,
        family: VLMFamily,
        suppress: torch.Tensor,
        temperature: float = 1.0,
        chunk: int = 1024,
        shared_prefix: bool = True,
    ):
        super().__init__()
        self.vlm = vlm  # the transformers model, or a peft model around it
        self.family = family
        self.temperature = temperature
        self.chunk = chunk
        self.register_buffer("suppress", suppress, persistent=False)  # [V] bool
        self.shared_prefix = shared_prefix
        self.ref_model: nn.Module | None = None  # frozen copy (full fine-tuning with reference_copy)
        self.any_process: Callable[[bool], bool] | None = None
        """set (through ``VLMPolicy.any_process``) when every forward is a collective over the processes (FSDP)"""
        self.process_max: Callable[[list[int]], list[int]] | None = None
        """set with ``any_process``: the element-wise maximum of integers over the processes"""

    @property
    def _no_split_modules(self) -> list[str]:
        """The wrapped model's blocks (transformers' ``_no_split_modules``: decoder layers, vision blocks), which
        accelerate's FSDP config (``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``) makes shard units of their
        own; without them the whole model would be one unit, gathered in full for every forward."""
        return list(getattr(self.hf, "_no_split_modules", None) or [])

    @property
    def hf(self) -> nn.Module:
        return self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm

    def backbone(self, hf: nn.Module) -> nn.Module:
        return self.family.backbone(hf)

    def train(self, mode: bool = True) -> VLMScorer:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    def vision_frozen(self) -> bool:
        """No trainable and no LoRA parameter in the vision tower: its features may be cached across calls."""
        tower = self.family.vision_tower(self.hf)
        if tower is None:
            return True
        return not any(p.requires_grad or "lora_" in n for n, p in tower.named_parameters())

    # -- prompt side
    def vision(self, hf: nn.Module, prompt: PromptInputs, cached: bool = False, store: bool = False) -> dict:
        """The prompt's vision features ``{kind: [n_tok, D], kind + "_...": family extras}``, one pass per kind.

        ``cached``: use ``prompt.features`` when present; ``store``: keep the features computed here (detached).
        """
        feats: dict[str, torch.Tensor] = {}
        for kind in ("image", "video"):
            got = {k: v for k, v in prompt.features.items() if k.split("_")[0] == kind} if cached else {}
            if kind not in got:
                got = self.family.vision_features(hf, prompt, kind)
                if store:
                    prompt.features.update({k: v.detach() for k, v in got.items()})
            feats.update(got)
        return feats

    def prompt_embeds(self, hf: nn.Module, prompt: PromptInputs, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings of the prompt with the vision features ``feats`` scattered in. -> [Lp, D]."""
        emb = hf.get_input_embeddings()(prompt.input_ids)  # [Lp, D]
        for kind in ("image", "video"):
            if kind not in feats:
                continue
            mask = prompt.input_ids == self.family.token_id(hf, kind)  # [Lp]
            if int(mask.sum()) != feats[kind].shape[0]:
                raise ValueError(f"{int(mask.sum())} {kind} tokens in the prompt but {feats[kind].shape[0]} features")
            emb = emb.masked_scatter(mask[:, None], feats[kind].to(emb.dtype))
        return emb

    def positions(self, prompt: PromptInputs, length: int, rows: int, start: int = 0) -> torch.Tensor:
        """Positions of sequence slots [start, Lp + length) for ``rows`` rows: [3, rows, L] (Qwen) or [rows, L]."""
        comp = prompt.next_position + torch.arange(length, device=prompt.input_ids.device)  # [Lc]
        full = torch.cat([prompt.positions, comp.expand(prompt.positions.shape[0], -1)], dim=1)[:, start:]  # [P, L]
        return self.family.expand_positions(full, rows)

    # -- scoring
    def group_hidden(self, hf: nn.Module, prompt: PromptInputs, comp: torch.Tensor, cached: bool) -> torch.Tensor:
        """Final hidden states [r, Lc, D] of r completions [r, Lc] of one prompt: slot t predicts completion token t
        (slot 0 is the prompt's last token)."""
        feats = self.vision(hf, prompt, cached)
        prompt_emb = self.prompt_embeds(hf, prompt, feats)  # [Lp, D]
        backbone = self.backbone(hf)
        if self.shared_prefix and not checkpointed(backbone):
            if comp.shape[1] == 1 and self.any_process is not None:
                # one completion token is one decoder forward, more are two: with collective forwards every process
                # makes two (the token repeated; causal attention leaves slot 0 as it was)
                return self.shared_prefix_hidden(hf, backbone, prompt, feats, prompt_emb, comp.repeat(1, 2))[:, :1]
            return self.shared_prefix_hidden(hf, backbone, prompt, feats, prompt_emb, comp)
        return self.expanded_hidden(hf, backbone, prompt, feats, prompt_emb, comp)

    def group_logprobs(self, hf: nn.Module, prompt: PromptInputs, comp: torch.Tensor, cached: bool) -> torch.Tensor:
        """Teacher-forced token log-probs of r completions [r, Lc] of one prompt. -> [r, Lc] fp32."""
        hidden = self.group_hidden(hf, prompt, comp, cached)
        return chunked_token_logprobs(
            hidden, hf.get_output_embeddings(), comp, self.chunk, self.temperature, self.suppress
        )

    @torch.no_grad()
    def rows_logprobs_entropy(
        self, prompts: list[PromptInputs], comp: torch.Tensor, cached: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs and the entropy of the distribution each token is scored under, both [n, Lc] fp32, no
        gradient (a frozen teacher's targets and their reliability); rows of one prompt share a forward."""
        hf = self.hf
        head = hf.get_output_embeddings()
        logp = torch.zeros(comp.shape, dtype=torch.float32, device=comp.device)
        ent = torch.zeros(comp.shape, dtype=torch.float32, device=comp.device)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(id(p), []).append(i)
        for rows in groups.values():
            hidden = self.group_hidden(hf, prompts[rows[0]], comp[rows], cached)  # [r, Lc, D]
            for j, row in enumerate(rows):  # one row's [Lc, V] logits at a time
                z = head(hidden[j]).float() / self.temperature
                z = z.masked_fill(self.suppress[: z.shape[-1]], float("-inf"))
                lsm = torch.log_softmax(z, dim=-1)  # [Lc, V]
                logp[row] = lsm.gather(-1, comp[row][:, None]).squeeze(-1)
                p = lsm.exp()
                ent[row] = -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1)
        return logp, ent

    def expanded_hidden(self, hf, backbone, prompt: PromptInputs, feats, prompt_emb, comp) -> torch.Tensor:
        """Hidden states [r, Lc, D] predicting each completion token: one forward of r rows (prompt + completion),
        the prompt repeated in every row."""
        r, Lc = comp.shape
        Lp = prompt_emb.shape[0]
        emb = torch.cat([prompt_emb[None].expand(r, -1, -1), hf.get_input_embeddings()(comp)], dim=1)  # [r, L, D]
        extra = self.family.decoder_kwargs(hf, prompt, feats, r, 0, Lp + Lc)  # e.g. Qwen3-VL's deepstack features
        out = backbone(inputs_embeds=emb, position_ids=self.positions(prompt, Lc, r), use_cache=False, **extra)
        return out.last_hidden_state[:, Lp - 1 : Lp - 1 + Lc]  # [r, Lc, D]: slot t predicts completion token t

    def shared_prefix_hidden(self, hf, backbone, prompt: PromptInputs, feats, prompt_emb, comp) -> torch.Tensor:
        """Hidden states [r, Lc, D] predicting each completion token, the prompt forwarded ONCE for its r rows (the
        shared-prefix idea of Prefix Grouper, 2025): a forward of the prompt [1, Lp] keeps its keys/values (with
        their graph), repeated for the r rows; a forward of the completions [r, Lc - 1] attends to them. The maths
        is the expanded forward's (each row's tokens see the same prompt keys/values and their own past, at the
        same positions), so log-probs and gradients agree up to float rounding; the prompt's gradient is the sum of
        its rows'. The last completion token predicts nothing and is not forwarded."""
        r, Lc = comp.shape
        Lp = prompt_emb.shape[0]
        extra = self.family.decoder_kwargs(hf, prompt, feats, 1, 0, Lp)  # e.g. Qwen3-VL's deepstack features
        out = backbone(inputs_embeds=prompt_emb[None], position_ids=self.positions(prompt, 0, 1), use_cache=True,
                       **extra)  # fmt: skip
        first = out.last_hidden_state[:, -1:].expand(r, 1, -1)  # [r, 1, D]: slot Lp - 1 predicts token 0
        if Lc == 1:
            return first
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(r)  # [r, H, Lp, d] per layer, still in the graph
        emb = hf.get_input_embeddings()(comp[:, :-1])  # [r, Lc - 1, D]
        extra = self.family.decoder_kwargs(hf, prompt, feats, r, Lp, Lc - 1)
        kw = {self.family.cache_kwarg(backbone): cache}
        out = backbone(inputs_embeds=emb, position_ids=self.positions(prompt, Lc - 1, r, start=Lp), use_cache=True,
                       **kw, **extra)  # fmt: skip
        return torch.cat([first, out.last_hidden_state], dim=1)  # [r, Lc, D]

    def _rows_logprobs(self, hf, prompts: list[PromptInputs], comp: torch.Tensor, cached: bool) -> torch.Tensor:
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(id(p), []).append(i)
        pieces, order = [], []
        for rows in groups.values():
            pieces.append(self.group_logprobs(hf, prompts[rows[0]], comp[rows], cached))
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long, device=comp.device)
        inverse[torch.tensor(order, device=comp.device)] = torch.arange(len(order), device=comp.device)
        return torch.cat(pieces)[inverse]  # [n, Lc] in the callers' row order

    def forward(
        self,
        prompts: list[PromptInputs] | None = None,
        completions: torch.Tensor | None = None,
        reference: bool = False,
        reuse_features: bool | None = None,
        run: Callable[[], Any] | None = None,
    ) -> Any:
        """prompts: n (one per row, shared objects per prompt); completions [n, L] -> logp [n, L], ref [n, L].

        ``reuse_features``: use the vision features cached in rollout (default: iff the vision tower is frozen,
        i.e. they cannot have changed; rollout forces it, its parameters have not changed since sampling).

        ``run``: return ``run()`` instead. Code that calls the model's pieces itself (the sampler's prefill and
        decode loop) runs as this module's forward, so the hooks a wrapper puts around it run too (FSDP2 gathers
        the root shard unit's parameters, e.g. the embeddings and the head, in its pre-forward hook).
        """
        if run is not None:
            return run()
        assert prompts is not None and completions is not None
        frozen = self.vision_frozen() if reuse_features is None else reuse_features
        logp = self._rows_logprobs(self.hf, prompts, completions, cached=frozen)
        ref = None
        if reference:
            with torch.no_grad():
                if self.ref_model is not None:
                    ref = self._rows_logprobs(self.ref_model, prompts, completions, cached=frozen)
                elif hasattr(self.vlm, "disable_adapter"):
                    with self.vlm.disable_adapter():
                        ref = self._rows_logprobs(self.hf, prompts, completions, cached=frozen)
                else:
                    raise UserError("a KL reference needs LoRA (finetune: lora) or policy.options.reference_copy=true")
        return logp, ref
