"""Write the AMPO demo set that configs/vlm_ampo.yaml trains: ``assets/shapes_ampo/ampo_guidance.jsonl`` + PNGs.

    python scripts/make_ampo_guidance.py                  # 24 synthetic shapes questions, seed 0

Each row is a synthetic shapes question (:func:`mmgrpo.pipelines.vlm_reasoning.shapes_question`) with its image and a
``guidance`` pool: correct solutions by two stand-in "teachers" that write them differently (a terse one, and one
that states the answer in its reasoning too). AMPO inserts the one the student understands best into a failed group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from mmgrpo.pipelines.vlm_reasoning import shapes_question


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/shapes_ampo")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.n):
        prompt, meta = shapes_question(i, args.seed, size=64)
        name = f"q{i:03d}.png"
        Image.fromarray(meta["images"][0]).save(out / name)
        a = meta["answer"]
        guidance = [
            {"text": f"<answer>{a}</answer>", "teacher": "terse"},
            {"text": f"<think>{a}</think><answer>{a}</answer>", "teacher": "explainer"},
        ]
        rows.append({"question": prompt["question"], "options": prompt["options"], "answer": a, "image": name,
                     "guidance": guidance})  # fmt: skip
    (out / "ampo_guidance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out / 'ampo_guidance.jsonl'}")


if __name__ == "__main__":
    main()
