"""What the learning benchmark (``bench/learning_vlm.py``) measures: its methods (:data:`METHODS`, one entry per
paper: a label and the config overrides that switch it on), its splits (:data:`SPLITS`), which (method, G) cells
its plan holds (:func:`planned`), KDRL's teachers (:class:`Teachers`) and the config overrides of one cell
(:func:`cell_overrides`). How the runs are made, logged and reported is ``bench/learning_vlm.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASELINE = "grpo"


@dataclass(frozen=True)
class Method:
    """One row: a label and the config overrides that switch the method on (``{G}``, ``{G+1}``: the cell's G)."""

    label: str
    overrides: tuple[str, ...] = ()
    small_groups: bool = False
    """its paper claims a gain at small G: a benchmark without ``--methods`` runs it (and GRPO) at the G of
    ``--groups`` below :data:`FULL_G` too; the other methods run there only when ``--methods`` names them"""


FULL_G = 8  # the demo's group size; every method runs at it
BINARY = "rewards=[{name: accuracy, weight: 1.0}]"
# The demo config is GRPO with DAPO's clip-higher (0.2 / 0.28) and token-mean aggregation, beta 0, one optimizer step
# per rollout. The reward is accuracy (1) + 0.2 format, so the highest weighted reward is 1.2 (NGRPO's r_max).
METHODS: dict[str, Method] = {
    "grpo": Method("GRPO (the demo config)"),
    "dr_grpo": Method("Dr. GRPO (no std, constant normaliser 28 tokens)", (
        "advantage.estimator=dr_grpo", "loss.aggregation={name: constant, options: {constant: 28}}")),
    "batch_std": Method("batch-std (group mean, batch std)", ("advantage.estimator=batch_std",)),
    "mc_grpo": Method("MC-GRPO (median baseline, G + 1 pivot rollout)", (
        "advantage.estimator=mc_grpo", "trainer.group_size={G+1}"), small_groups=True),
    "ngrpo": Method("NGRPO (virtual max reward 1.2)", (
        "advantage.estimator=ngrpo", "advantage.options={r_max: 1.2}")),
    "bnpo": Method("BNPO (beta-normalised, rewards scaled from [0, 1.2])", (
        "advantage.estimator=bnpo", "advantage.options={r_min: 0.0, r_max: 1.2}")),
    "gspo": Method("GSPO (sequence-level ratio)", ("loss.name=gspo",)),
    "dapo_ds": Method("DAPO dynamic sampling (refill zero-variance groups, 3 rounds)", (
        "advantage.dynamic_sampling=true", "advantage.max_refill_rounds=3")),
    "tempsamp": Method("TempSamp-R1 (ground truth as a G + 1-th row, soft shaping)", (
        "methods.tempsamp={anchor_factor: 1.2, position: last}", "advantage.shaping=tempsamp_soft",
        "advantage.shaping_options={tau: 0.8, a1: 0.01, a2: 1.0}", "trainer.group_size={G+1}")),
    "pearl": Method("PEARL (perception checklist group, cap 0.5)", (
        "methods.pearl={cap: 0.5, checklist_weight: 0.1, reward: pearl_checklist}",
        "rewards=[{name: accuracy, weight: 1.0}, {name: format, weight: 0.2, streams: [reasoning]}, "
        "{name: pearl_checklist, weight: 1.0}]")),
    # issue 17's papers, with the switches their branches (h7-h10) document in docs/architecture.md's paper table;
    # each reads "not available" until its module is merged.
    # the samplers and PACS read rewards as success rates / labels in [0, 1]: the 0/1 accuracy alone (the shipped
    # model's format rate is 1.0, so the demo's 0.2 x format is a constant there)
    "spo": Method("SPO (per-prompt value tracker, batch-normalised; accuracy only)", (
        "sampler={name: spo}", "advantage.estimator=spo", BINARY), small_groups=True),
    "gdro": Method("GDRO (difficulty bins, square-root rollout allocation; accuracy only)", (
        "sampler={name: gdro}", BINARY)),
    "beyond_variance": Method("Beyond Variance (pairing, weighted GRPO 2 / 2; accuracy only)", (
        "sampler={name: pairing}", "advantage.estimator=weighted_grpo", "advantage.options={w_pos: 2.0, w_neg: 2.0}",
        BINARY)),
    "vspo": Method("VSPO (zero-variance groups replaced by high-value prompts; accuracy only)", (
        "sampler={name: vspo}", "advantage.dynamic_sampling=true", BINARY)),
    "prs": Method("PRS (accuracy counts once the format holds)", (
        "rewards=[{name: prs, options: {stages: [{name: format, threshold: 1.0}, {name: accuracy}]}}]",)),
    # Scaf-GRPO's exemption period is a fraction of max_steps, which a time budget does not set: hints from step 0
    "scaf_grpo": Method("Scaf-GRPO (tiered hints on all-fail groups)", (
        "methods.scaf_grpo={exemption_fraction: 0.0}",)),
    "hill": Method("HiLL (hints by the policy, kept with learning signal)", ("methods.hill={}",)),
    "cog_drift": Method("Cog-DRIFT (cloze / multiple-choice reformulations)", ("methods.cog_drift={}",)),
    "ampo": Method("AMPO (guidance when the on-policy group fails)", ("methods.ampo={}",)),
    "nft": Method("NFT, token level (implicit negative policy)", ("methods.nft={}",)),
    "pacs": Method("PACS (reward as a label, log-ratio as the score; accuracy only)", (
        "advantage.estimator=pacs", "loss.name=pacs", "loss.options={}",
        "loss.aggregation={name: constant, options: {constant: 1}}", BINARY)),
    "srpo": Method("SRPO (failed rows distilled from an EMA self-teacher, correct rows GRPO)", (
        "methods.srpo={teacher: ema, strip_thinking: true}",)),
    "poise": Method("POISE (hidden-state probe as the baseline)", ("methods.poise={}",)),
    "dagrpo": Method("DaGRPO (distinctiveness masking, anchors)", ("methods.dagrpo={}",)),
    "posterior": Method("Posterior-GRPO (format counts only when correct)", (
        "rewards=[{name: accuracy, weight: 1.0, kind: outcome}, {name: format, weight: 0.2, kind: process}]",
        "advantage.combine=posterior")),
    "egrpo": Method("E-GRPO (partial credit for entity overlap)", (
        "methods.egrpo={}", "rewards=[{name: entity_credit, weight: 1.0, options: {alpha: 0.3}}, "
        "{name: format, weight: 0.2}]")),
    "mapo": Method("MAPO (mixed advantage)", ("advantage.estimator=mapo",)),
    "dynamic_weights": Method("Dynamic reward weighting (accuracy / format)", ("methods.dynamic_weights={}",)),
    "microcoder": Method("MicroCoder-GRPO (conditional truncation, temperature by diversity)", (
        "methods.microcoder={}",)),
    "strata": Method("Stratified GRPO (strata = question kind)", (
        "advantage.estimator=stratified", "methods.strata={meta_key: kind}")),
    # the paper's k2 estimator and its annealing 5e-3 -> 1e-3 (over ~the steps a run makes); {teacher}: see TEACHER
    "kdrl": Method("KDRL (reverse KL to a GRPO-trained teacher, 5e-3 -> 1e-3)", (
        "methods.kdrl={teacher: '{teacher}', coef: 0.005, coef_final: 0.001, anneal_steps: 300, estimator: k2}",)),
}  # fmt: skip

TEACHER_STEPS, TEACHER_SEED = 1200, 1000
TEACHERS = Path(__file__).parent / "teachers"  # not committed (.gitignore): ~6 MB each, remade by the benchmark
"""KDRL's teacher (``{teacher}`` in a method's overrides) for a split: the shipped model trained with the demo's GRPO
on that split for ``TEACHER_STEPS`` steps at G = 8 (``run.seed`` ``TEACHER_SEED``, so not the runs' prompt order),
LoRA merged, exported as a transformers folder (``mmgrpo.train.export``). A fixed number of steps, not a time
budget, so every machine makes the same teacher; the benchmark makes it once, in a worker of its own, before the
runs that need it (their budget does not include it: the paper's teacher is given). The results file gives its
held-out accuracy. The shapes world has no stronger model to distil from; this one is stronger on the split than
anything a 300 s run reaches."""


@dataclass(frozen=True)
class Teachers:
    """Where KDRL's teachers live and how many steps make one (:data:`TEACHER_STEPS`; ``--quick``: 2, in a temporary
    folder)."""

    root: Path = TEACHERS
    steps: int = TEACHER_STEPS

    def dir(self, split: str) -> Path:
        """The split's teacher folder (a transformers model once made)."""
        return self.root / f"{split}_grpo_g8_{self.steps}steps_seed{TEACHER_SEED}"

    def missing(self, cells: list[tuple]) -> list[str]:
        """The splits whose teacher some of ``cells`` need and that is not made yet."""
        need = {sp for m, sp, _, _ in cells if needs_teacher(m)}
        return sorted(sp for sp in need if not self.dir(sp).exists())


@dataclass(frozen=True)
class Split:
    label: str
    overrides: tuple[str, ...] = ()


SPLITS: dict[str, Split] = {
    "normal": Split("normal (the demo's shapes QA: count / colour / position, 64 px)"),
    "hard": Split(
        "hard (options shuffled off their usual letters, train and held-out)", ("data.options.difficulty=shuffled",)
    ),
}

HARD_SPLIT_NOTE = (
    "options shuffled off their usual letters (data.options.difficulty: shuffled). Measured on the shipped model "
    "before training (the demo's sampling, temperature 0.5; 256 training groups, 2026-12-04): all-fail groups 0.69 "
    "at G = 8 and 0.81 at G = 2 (normal split: 0.14 and 0.27); sampled accuracy 0.14 (normal: 0.62)."
)


def expand(overrides: tuple[str, ...] | list[str], G: int, teacher: Path | None = None) -> list[str]:
    """Overrides with ``{G}`` / ``{G+1}`` replaced by the cell's group size (and one more), ``{teacher}`` by
    ``teacher`` (the split's KDRL teacher folder)."""
    out = [o.replace("{G+1}", str(G + 1)).replace("{G}", str(G)) for o in overrides]
    return [o.replace("{teacher}", str(teacher)) for o in out] if teacher is not None else out


def planned(method: str, G: int, asked: bool) -> bool:
    """Whether a cell is in the benchmark's plan: every cell of the methods ``--methods`` names (``asked``); without
    it every method at G >= :data:`FULL_G`, and at a smaller G GRPO and the methods whose papers claim their gain
    there (:attr:`Method.small_groups`)."""
    return asked or G >= FULL_G or method == BASELINE or METHODS[method].small_groups


def needs_teacher(method: str) -> bool:
    return any("{teacher}" in o for o in METHODS[method].overrides)


def cell_overrides(method: str, split: str, G: int, extra: list[str], teachers: Teachers = Teachers()) -> list[str]:
    """The overrides of one (method, split, G) cell: the split, G, the method (may raise G), then ``extra``."""
    method_overrides = expand(METHODS[method].overrides, G, teachers.dir(split))
    return [*base_overrides(split), f"trainer.group_size={G}", *method_overrides, *extra]


def base_overrides(split: str) -> list[str]:
    """The shipped model by absolute path (runs from any directory), then the split's data overrides."""
    return [f"policy.options.path={ROOT / 'assets' / 'shapes_vlm'}", *SPLITS[split].overrides]
