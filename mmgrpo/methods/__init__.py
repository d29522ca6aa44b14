"""Paper methods: one module per paper, each registering one :class:`~mmgrpo.methods.registry.Method` (its options
schema and its parts: rewards, a policy wrapper, advantage hooks), switched on by the config's top-level ``methods:``
block and checked when the config loads (:mod:`mmgrpo.methods.registry`).

- :mod:`mmgrpo.methods.pearl` -- PEARL perception checklists: checklist reward, two-stream policy, fidelity gate.
- :mod:`mmgrpo.methods.tempsamp` -- TempSamp-R1: the ground truth as a teacher-forced off-policy row, anchored.
- :mod:`mmgrpo.methods.acre` -- ACRE answer consistency: shuffle options, re-ask with the same reasoning (reward).
- :mod:`mmgrpo.methods.listener` -- listener-rewarded thinking: a frozen VLM scores the reasoning (rewards).
- :mod:`mmgrpo.methods.medloc` -- MedLoc-R1's performance-aware IoU curriculum (stateful reward).
- :mod:`mmgrpo.methods.mmupt` -- MM-UPT's majority vote, no ground truth (group-aware reward).

Pure estimators and losses stay one registered function in the core (MC-GRPO's pivot, Dr.GRPO, GSPO, ...); the
diffusion papers are exploration / objective strategies of :mod:`mmgrpo.policies` (docs/architecture.md's table).
"""
