"""HiLL: hints written for the current reasoner's failure by a hinter model, kept only when they create learning
signal. Switched on by ``methods: {hill: {hinter: "", max_rounds: 2}}`` (configs/vlm_hill.yaml).

Yu Xia, Canwen Xu, Zhewei Yao, Julian McAuley, Yuxiong He, "Learning to Hint for Reinforcement Learning" (2026,
arXiv 2604.00698).

The paper: GRPO's advantage collapses when every rollout of a question fails (``A_i = (r_i - mean r) / std r = 0``).
Fixed hints are not adapted to the current reasoner, so HiLL has a *hinter* write a hint h online for each hard
question, conditioned on the question x, the reasoner's incorrect rollout o^- and a reference solution y*:

    h ~ pi_hint(. | x, o^-, y*)                      (failure-conditioned hint)
    o_1..o_G ~ pi(. | x + h),  group kept for the reasoner's GRPO update when it is not degenerate (std r > 0)

The hinter is itself trained with RL on a transfer-weighted reward: a hint that recovers a non-degenerate group
earns reward, discounted by its *hint reliance* (how much less likely the correct hinted trajectories are once the
hint is removed), which favours hints whose learning transfers to the no-hint test-time policy.

What this module implements: the hinter writes one hint per failing group and attempt from a prompt built by
``hinter_prompt`` (the question with its options, the first failed row's answer and the reference answer; the
example's images are shown to it too), ``template`` appends the hint to the question, the group is sampled again,
and (``keep: signal``) the hinted group replaces the failed one only if its rewards are not all equal; else the next
attempt writes a new hint (``max_rounds``). A hint that is itself an answer (graded correct, a bare option letter
or an option's text; ``reject_answers``) is dropped: a small policy asked to hint often just names an option, which
would leak the answer or mislead (the paper's hint-reliance penalty steers its trained hinter away from such hints).
The hinter is the policy itself (``hinter: ""``; it answers in the
policy's format, and the hint is its ``<answer>`` block or its whole text, capped at ``max_hint_chars``) or a frozen
VLM loaded like the ``vlm_listener``'s listener (:func:`mmgrpo.policies.vlm.load_vlm`, lazily, no gradient).

Not done versus the paper: the hinter is not trained (no RL on the transfer-weighted reward, no hint-reliance
estimate): the policy-as-hinter is only trained as the reasoner, and a frozen hinter never changes. Hints that
leak the answer are not filtered. Diffusion: not applicable -- the method rescues all-incorrect groups of a
verifiable reasoning reward; an image generator has no incorrect answer a hinter could diagnose, and a hint in a
text-to-image prompt would change the image the reward scores.

>>> hint_of("<think>look</think><answer>Count the red shapes only.</answer>", 100)
'Count the red shapes only.'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import (
    RerollOptions,
    RewriteRequest,
    check_reroll,
    question_of,
    register_rewriter,
    with_question,
)
from mmgrpo.core.types import PromptBatch
from mmgrpo.methods.registry import Method, Rewrite, register_method
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.policies.vlm_inputs import MEDIA_KEYS, question_text
from mmgrpo.policies.vlm_load import TEMPERATURES
from mmgrpo.rewards.text import answer_or_completion, completion_text, grade, normalize_text

HINTER_PROMPT = (
    "A student answered this question wrongly.\nQuestion: {question}\nThe student's answer: {attempt}\n"
    "The correct answer: {answer}\nWrite one short hint that helps the student reach the correct answer by "
    "themselves, without stating it."
)


@dataclass
class HillOptions(RerollOptions):
    """HiLL's options: the re-roll options (trigger all_fail on ``reward``) and the hinter."""

    keep: str = "signal"
    """signal: the hinted group is kept only if it has learning signal (the paper's non-degenerate groups)"""
    max_rounds: int = 2
    """hints written per failing group and step (each attempt a fresh hint, from its own seed)"""
    hinter: str = ""
    """"" = the policy itself writes the hints; else a frozen VLM (local folder or hub id) loaded like the policy"""
    hinter_dtype: str = "float32"
    hinter_max_new_tokens: int = 48
    """a frozen hinter's hint length in tokens (the policy as hinter uses its own max_new_tokens)"""
    hinter_temperature: float = 1.0
    """a frozen hinter's sampling temperature"""
    hinter_prompt: str = HINTER_PROMPT
    """what the hinter reads; {question} (with options), {attempt} (a failed answer), {answer} (the ground truth)"""
    template: str = "{question}\nHint: {hint}"
    """the hinted question; {question} and {hint} are filled in"""
    max_hint_chars: int = 300
    answer_key: str = "answer"
    reject_answers: bool = True
    """drop a hint that is itself an answer (graded correct, a bare option letter or an option's text): no re-roll"""


def hint_of(text: str, max_chars: int) -> str:
    """The hint in a hinter's completion: its last <answer> block, else the text with <think> blocks removed; tags
    dropped, whitespace collapsed, at most ``max_chars`` characters."""
    body = answer_or_completion(completion_text(text))
    body = re.sub(r"<think>.*?</think>", " ", body, flags=re.DOTALL)
    body = re.sub(r"</?\w+>", " ", body)
    return " ".join(body.split())[:max_chars].strip()


def is_answer(hint: str, prompt: Any, meta: dict, answer_key: str = "answer") -> bool:
    """A "hint" that is an answer rather than guidance: graded correct for the ground truth, a bare option letter
    ("C", "(b)"), or the text of one of the prompt's options."""
    gt = meta.get(answer_key)
    if gt is not None and grade(hint, gt):
        return True
    if re.fullmatch(r"\(?[A-Za-z]\)?\.?", hint.strip()):
        return True
    options = prompt.get("options") if isinstance(prompt, dict) else None
    return normalize_text(hint) in {normalize_text(str(o)) for o in options or ()}


@register_rewriter("hill_hinter")
class HillHinter:
    """HiLL hints: a hinter model writes a hint from the question, a failed answer and the reference answer."""

    def __init__(self, opts: HillOptions):
        self.opts = opts
        self.frozen: VLMPolicy | None = None

    def hinter(self, policy: Any) -> Any:
        """The policy itself, or the frozen hinter VLM (loaded on the first call, onto the policy's device)."""
        o = self.opts
        if not o.hinter:
            return policy
        if self.frozen is None:
            options = VLMPolicyOptions(
                path=o.hinter, dtype=o.hinter_dtype, finetune="full", max_new_tokens=o.hinter_max_new_tokens,
                temperature=o.hinter_temperature,
            )  # fmt: skip
            device = getattr(policy, "device", None)
            self.frozen = VLMPolicy.from_pretrained(o.hinter, options, device=device)
            self.frozen.model.requires_grad_(False).eval()
        return self.frozen

    def hinter_batch(self, request: RewriteRequest) -> PromptBatch:
        o, prompts, meta = self.opts, [], []
        for b, (prompt, m) in enumerate(zip(request.prompts, request.meta)):
            failed = answer_or_completion(completion_text(request.completions[b][0])) if request.completions[b] else ""
            text = o.hinter_prompt.format(
                question=question_text(prompt), attempt=failed or "(none)", answer=m.get(o.answer_key)
            )
            prompts.append(text)
            meta.append({k: m[k] for k in MEDIA_KEYS if k in m})  # the images, not the answer
        return PromptBatch(prompts=prompts, meta=meta, seeds=list(request.seeds), step=request.step)

    def __call__(self, request: RewriteRequest) -> list[tuple[Any, dict] | None]:
        texts = self.hinter(request.policy).generate(self.hinter_batch(request), greedy=False)
        out = []
        for prompt, meta, text in zip(request.prompts, request.meta, texts):
            hint = hint_of(text, self.opts.max_hint_chars)
            if not hint or (self.opts.reject_answers and is_answer(hint, prompt, meta, self.opts.answer_key)):
                out.append(None)
                continue
            rewritten = self.opts.template.format(question=question_of(prompt), hint=hint)
            out.append((with_question(prompt, rewritten), {**meta, "hint": hint, "rewrite": "hill"}))
        return out


def check_hill(opts: HillOptions, cfg: Any, key: str) -> None:
    check_reroll(opts, cfg, key)
    if opts.mode == "mix":
        raise UserError(f"{key}: mode=mix is Scaf-GRPO's row swap; HiLL trains the hinted group: use replace or add")
    for name in ("question", "attempt", "answer"):
        if "{" + name + "}" not in opts.hinter_prompt:
            raise UserError(f"{key}: hinter_prompt must contain {{{name}}} (the hinter conditions on it)")
    if "{question}" not in opts.template or "{hint}" not in opts.template:
        raise UserError(f"{key}: template={opts.template!r} must contain {{question}} and {{hint}}")
    lo, hi = TEMPERATURES  # the hinter samples as a policy does: the policy's bound, said under this key at load
    if opts.hinter_max_new_tokens < 1 or not lo <= opts.hinter_temperature <= hi or opts.max_hint_chars < 1:
        raise UserError(
            f"{key}: hinter_max_new_tokens={opts.hinter_max_new_tokens}, max_hint_chars={opts.max_hint_chars} must "
            f"be >= 1 and hinter_temperature={opts.hinter_temperature} in {lo:g}..{hi:g} (the sampling "
            "temperatures a VLM policy takes)"
        )


METHOD = register_method(
    Method(
        name="hill",
        paper="HiLL (Xia et al. 2026, arXiv 2604.00698): a hinter writes hints for failed groups, kept if they help",
        options=HillOptions,
        pipelines=("vlm_reasoning",),
        data_keys=("answer",),
        check=check_hill,
        rewrite=lambda opts, cfg: Rewrite("hill", HillHinter(opts), opts),
    )
)
