"""Pure pieces of multimodal RL methods, wired into the VLM policy and trainer through named hooks (DESIGN.md).

- :mod:`mmgrpo.methods.acre` -- ACRE answer consistency: shuffle options, re-ask with the same reasoning.
- :mod:`mmgrpo.methods.pearl` -- PEARL perception checklists: checklist reward, fidelity gate, per-stream weights.
- :mod:`mmgrpo.methods.tempsamp` -- TempSamp-R1: inject the ground truth as an off-policy row, anchor its advantage.

The reward-shaped methods live in ``rewards/``: ``iou_curriculum`` (MedLoc-R1, mmgrpo/rewards/curriculum.py),
``majority_vote`` (MM-UPT, mmgrpo/rewards/consensus.py) and ``listener`` (listener-rewarded thinking,
mmgrpo/rewards/listener.py).
"""
