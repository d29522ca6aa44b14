"""E-GRPO: partial credit for near-miss answers, proportional to the ground-truth entities their reasoning names.

Zhao et al. 2025, "Repurposing Synthetic Data for Fine-grained Search Agent Supervision" (arXiv 2510.24694; ICLR
2026), Entity-aware Group Relative Policy Optimization. Outcome-only GRPO gives every wrong answer 0, so a "near
miss" (the reasoning found most of what was needed, the final answer is off) counts as a complete failure. E-GRPO
keeps the ground-truth entities of each example and gives wrong rollouts a partial reward proportional to their
entity match rate:

    gamma_i = |{e in E_gt : e occurs in rollout i}| / |E_gt|                 (entity match rate)
    gamma^_i = gamma_i / max_{j in group} gamma_j     (0 when the max is 0; ``group_normalize``, the paper's
                                                       "normalized" rate; off: gamma^_i = gamma_i)
    r_i = 1                      if the answer is correct
        = alpha * gamma^_i       otherwise,     0 <= alpha < 1

so a correct answer always beats any near miss, and a near miss beats a complete failure. Any estimator follows.

Here (our reading, for the VLM reasoning recipe):

- correctness is ``accuracy``'s grading (:func:`mmgrpo.rewards.text.grade` of the ``<answer>`` block, or the whole
  completion, against ``meta[answer_key]``);
- the entities E_gt are ``meta[entities_key]`` (a list of strings; the shapes QA world gives the distinct
  "colour shape" objects of the scene, e.g. ["red circle", "blue square"]). Without that key the "atoms" of the
  answer are used: the words of the ground-truth option's text for a multiple-choice letter (the prompt's
  ``options``), else the words of the answer;
- an entity occurs when its normalised text (:func:`mmgrpo.rewards.text.normalize_text`) appears as whole words in
  the normalised completion (reasoning and answer; tags such as ``<think>`` count as spaces).

``alpha`` defaults to 0.3 (the abstract gives no value; it keeps every near miss well below a correct answer).
Rows without a ground truth get None. Logged: ``egrpo/near_miss`` (fraction of wrong rows given partial credit) and
``egrpo/match_rate`` (mean gamma over the rows scored).

The whole method is the reward ``entity_credit`` (:data:`METHOD`; listing it under ``rewards:`` runs it, e.g. in
place of ``accuracy``: ``rewards: [{name: format, weight: 0.5}, {name: entity_credit}]``).

>>> match_rate(["red circle", "blue square"], "<think>I see a red circle</think><answer>B</answer>")
0.5
"""

from __future__ import annotations

import re
import string
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import answer_or_completion, check_mode, completion_text, grade, normalize_text

LETTERS = string.ascii_uppercase


def _occurs(entity: str, text: str) -> bool:
    """Normalised ``entity`` occurs in normalised ``text`` as whole words."""
    e = normalize_text(entity)
    return bool(e) and re.search(rf"(?<!\S){re.escape(e)}(?!\S)", text) is not None


def match_rate(entities: list[str], completion: str) -> float:
    """gamma: the fraction of ``entities`` that occur in ``completion`` (whole words, normalised); 0 for none."""
    ents = [e for e in dict.fromkeys(str(x) for x in entities) if normalize_text(e)]
    if not ents:
        return 0.0
    text = normalize_text(re.sub(r"<[^<>]*>", " ", completion))  # tags apart: "<think>a" must not read "thinka"
    return sum(_occurs(e, text) for e in ents) / len(ents)


def answer_atoms(gt: Any, prompt: Any) -> list[str]:
    """The ground truth's atoms: the words of the chosen option's text for a letter answer with ``options`` in the
    prompt, else the words of the answer itself (a list answer: the words of its first entry)."""
    if isinstance(gt, list | tuple):
        gt = gt[0] if gt else ""
    s = str(gt).strip().strip("().").upper()
    options = prompt.get("options") if isinstance(prompt, dict) else None
    if len(s) == 1 and s in LETTERS and options and LETTERS.index(s) < len(options):
        return normalize_text(str(options[LETTERS.index(s)])).split()
    return normalize_text(str(gt)).split()


def entity_rewards(
    correct: torch.Tensor, gamma: torch.Tensor, group: torch.Tensor, alpha: float = 0.3, group_normalize: bool = True
) -> torch.Tensor:
    """E-GRPO rewards [N]: 1 where ``correct`` [N] (bool), else alpha * gamma^ with gamma [N] in [0, 1] normalised by
    the max of its group (``group`` [N] group index of each row) when ``group_normalize``."""
    g = gamma.float()
    if group_normalize:
        top = torch.zeros(int(group.max()) + 1 if group.numel() else 0).scatter_reduce(
            0, group.long(), g, "amax", include_self=False
        )  # [B]
        den = top[group.long()]  # [N]
        g = torch.where(den > 0, g / den.clamp_min(1e-12), torch.zeros_like(g))
    return torch.where(correct.bool(), torch.ones_like(g), alpha * g)


@register("entity_credit")
def entity_credit_reward(
    alpha: float = 0.3,
    group_normalize: bool = True,
    entities_key: str = "entities",
    answer_key: str = "answer",
    answer_tag: str = "answer",
    mode: str = "auto",
):
    """E-GRPO reward: 1 for a correct answer, alpha x (normalised) entity match rate for a wrong one (module doc)."""
    if not 0.0 <= alpha < 1.0:
        raise UserError(
            f"entity_credit: alpha={alpha} must lie in [0, 1): a near miss must score below a correct answer (1)"
        )
    check_mode("entity_credit", mode)
    stats: dict[str, float] = {}

    def fn(samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions, grouped (group_aware)
        n = len(samples)
        has_gt = [m.get(answer_key) is not None for m in meta]
        correct, gamma = torch.zeros(n, dtype=torch.bool), torch.zeros(n)
        for i, (s, p, m) in enumerate(zip(samples, prompts, meta)):
            if not has_gt[i]:
                continue
            text = completion_text(s)
            correct[i] = grade(answer_or_completion(text, answer_tag), m[answer_key], mode)
            ents = m.get(entities_key)
            gamma[i] = match_rate(list(ents) if ents else answer_atoms(m[answer_key], p), text)
        group = ctx.group if ctx is not None and ctx.group is not None else torch.zeros(n, dtype=torch.long)
        out = entity_rewards(correct, gamma, group, alpha, group_normalize)
        scored = torch.tensor(has_gt)
        wrong = scored & ~correct
        stats["egrpo/near_miss"] = float((out[wrong] > 0).float().mean()) if wrong.any() else 0.0
        stats["egrpo/match_rate"] = float(gamma[scored].mean()) if scored.any() else 0.0
        return [float(v) if ok else None for v, ok in zip(out.tolist(), has_gt)]

    fn.group_aware = True  # the match rate is normalised within each group
    fn.last_metrics = lambda: dict(stats)
    return fn


METHOD = register_method(
    Method(
        name="egrpo",
        paper="E-GRPO (Zhao et al. 2025, arXiv 2510.24694): partial credit for near misses by entity match rate",
        pipelines=("vlm_reasoning",),
        rewards=("entity_credit",),
        reward_switched=True,
        data_keys=("answer", "entities"),
        data_keys_needed="none",  # without entities, the answer's atoms are used
    )
)
