"""The two sides of each comparison of ``bench/peers.py``, run in its worker processes: builders of one training step
of mmgrpo and of its peer (TRL's ``GRPOTrainer``, the Flow-GRPO loop of ``bench/flow_grpo_peer.py``, the diffusers
pipeline through ``bench/rollout.py``), the meter of the step's compute fraction, and the worker that times them
(``peers.py --worker``; one result line per job)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (ROOT, BENCH):  # mmgrpo, and the peer loop next to this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
SHAPES_T2I = ROOT / "assets" / "shapes_t2i"
RESULT = "PEERS_RESULT "
FRACTION = 0.99  # Flow-GRPO's timestep_fraction: the first int(0.99 T) steps are trained


def trained_steps(T: int) -> int:
    return int(T * FRACTION)


def peer_config(s: dict[str, Any]):
    from flow_grpo_peer import FlowGRPOConfig

    return FlowGRPOConfig(num_steps=s["T"], num_image_per_prompt=s["G"], prompts_per_epoch=s["B"],
                          max_sequence_length=s.get("t5_tokens", 0),
                          guidance_scale=s.get("guidance", 1.0))  # fmt: skip


def accelerator(device: str):
    """The accelerator of mmgrpo's trainer on ``device``: None (the trainer's own, which takes the GPU when there is
    one), or a CPU one when ``device`` is cpu on a machine with a GPU."""
    import torch

    if device == "cpu" and torch.cuda.is_available():
        from accelerate import Accelerator

        return Accelerator(cpu=True)
    return None


def diffusion_mmgrpo(
    s: dict[str, Any], overrides: list[str], run_dir: str, device: str = "cpu", model: str | None = None
):
    """A text_to_image Trainer on ``model`` (default: the shapes model) with Flow-GRPO's settings; -> (step
    function, rows per step). ``s["t5_tokens"]``: the zero T5 tokens of a model without T5 (the peer's
    max_sequence_length)."""
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    T, k = s["T"], trained_steps(s["T"])
    peer = peer_config(s)
    base = {
        "pipeline": "text_to_image",
        "run": {"name": "mmgrpo", "seed": 0},
        "policy": {"options": {
            "family": "sd3", "path": model or str(SHAPES_T2I), "num_steps": T, "lora_rank": 0, "objective": "sde",
            "guidance_scale": peer.guidance_scale,
            "adapter_options": {"max_sequence_length": s["t5_tokens"]} if "t5_tokens" in s else {},
            "sde": {"kind": "flow_grpo", "noise_level": peer.noise_level},
            "exploration": {"name": "full", "timestep_fraction": k / T, "selection": "first"},
        }},
        "data": {"options": {"prompts": "shapes", "heldout_prompts": ""}},
        "rewards": [{"name": s.get("reward", "shapes")}],
        "advantage": {"estimator": "grpo"},
        "loss": {"name": "grpo", "options": {"clip_low": peer.clip_range, "clip_high": peer.clip_range},
                 "adv_clip": peer.adv_clip_max, "beta": 0.0},
        "trainer": {"prompts_per_step": s["B"], "group_size": s["G"], "minibatches": peer.optimizer_steps,
                    "lr": peer.learning_rate, "weight_decay": peer.adam_weight_decay, "max_grad_norm": 1.0,
                    "eval_every": 0, "checkpoint_every": 0, "progress": False, "max_steps": 10**6},
    }  # fmt: skip
    cfg = load_config(None, [f"run.output_dir={run_dir}", *overrides], base=base)
    trainer = Trainer(cfg, Path(run_dir) / "mmgrpo", accelerator(device))
    plan = trainer.policy.plan(None)
    assert int(plan.train_mask.sum()) == k, (plan.train_mask, k)  # the same trained steps as the peer
    return trainer_step(trainer), s["B"] * s["G"]


def trainer_step(trainer):
    """One step of Trainer._train's loop body (collect, rollout metrics, advantage, update), without logging."""

    def step() -> dict[str, float]:
        n = trainer.step
        rollout, cols, metrics = trainer.collect(n)
        if hasattr(trainer.policy, "rollout_metrics"):
            metrics.update(trainer.policy.rollout_metrics(rollout))
        adv, row_w, m_adv = trainer.advantage(cols, rollout, n)
        metrics.update(m_adv, **trainer.update(rollout, adv, row_w, n))
        trainer.step = n + 1
        out = {k: float(v) for k, v in metrics.items() if k in ("reward/mean", "completion/length_mean")}
        skipped = metrics.get("update/skipped_rows_frac", 0.0)  # zero-advantage rows (trainer.skip_zero_advantage)
        return {**out, "trained_rows": rollout.num_rows * (1.0 - float(skipped))}

    return step


def diffusion_flow_grpo(s: dict[str, Any], device: str = "cpu", model: str | None = None):
    from flow_grpo_peer import FlowGRPOLoop

    import mmgrpo.rewards.jpeg  # noqa: F401  (registers the rewards)
    import mmgrpo.rewards.shapes  # noqa: F401
    from mmgrpo.data.prompts import PromptList, read_prompts
    from mmgrpo.rewards.registry import get as get_reward

    # the prompts in mmgrpo's stream order (run.seed 0): the loop walks its list in order, B per epoch, so epoch e
    # samples exactly the prompts of mmgrpo's step e (the two sides then differ only in their noise)
    train = read_prompts("shapes", "train", 0)
    prompts = PromptList(train, 0).get(list(range(2 * len(train)))).prompts
    path = model or str(SHAPES_T2I)
    loop = FlowGRPOLoop(path, peer_config(s), prompts, get_reward(s.get("reward", "shapes")), device=device)
    return loop.step, s["B"] * s["G"]


def vlm_examples(s: dict[str, Any], n: int = 64):
    from mmgrpo.pipelines.vlm_reasoning import shapes_question

    return [shapes_question(i, 0, s["image"]) for i in range(n)]


def vlm_mmgrpo(s: dict[str, Any], model: str, overrides: list[str], run_dir: str, device: str = "cpu"):
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    base = {
        "pipeline": "vlm_reasoning",
        "run": {"name": "mmgrpo", "seed": 0},
        "data": {"options": {"num_examples": 64, "image_size": s["image"], "eval_examples": 1}},
        "policy": {"options": {"path": model, "max_new_tokens": s["tokens"], "temperature": 1.0, "finetune": "full"}},
        "rewards": [{"name": n} for n in vlm_reward_names(s)],
        "advantage": {"estimator": "grpo"},
        "loss": {"name": "grpo", "beta": 0.0},
        "trainer": {"prompts_per_step": s["B"], "group_size": s["G"], "lr": 1e-5, "eval_every": 0,
                    "checkpoint_every": 0, "progress": False, "max_steps": 10**6},
    }  # fmt: skip
    cfg = load_config(None, [f"run.output_dir={run_dir}", *overrides], base=base)
    trainer = Trainer(cfg, Path(run_dir) / "m", accelerator(device))
    return trainer_step(trainer), s["B"] * s["G"]


VLM_CONTINUOUS = "peer_sides.text_compressibility"  # a reward by dotted path, as a user's plug-in is named


def text_compressibility():
    """A continuous reward for the VLM rows: minus the zlib-compressed size of a completion's UTF-8 text over its raw
    size (the text analogue of DDPO's ``jpeg_compressibility``). The format and accuracy rewards give a random-weight
    model 0 on every row, so every group has zero spread: mmgrpo then forwards one row of the step
    (``trainer.skip_zero_advantage``, whose gradient is the same) while TRL trains all B x G; with this term a group's
    rows practically never score alike, so both sides train every row (equal work; the table's trained rows say so)."""

    from mmgrpo.rewards.text import completion_text

    def fn(samples, prompts, meta, ctx) -> list[float]:
        raws = [completion_text(s).encode("utf-8") for s in samples]
        return [-len(zlib.compress(raw, 9)) / max(1, len(raw)) for raw in raws]

    return fn


def vlm_reward_names(s: dict[str, Any]) -> list[str]:
    """The VLM rows' rewards: format + accuracy (the R1 verifier), plus the continuous term unless the point is the
    verifier-only row (``s["reward"] == "verifier"``)."""
    return ["format", "accuracy"] + ([] if s.get("reward") == "verifier" else [VLM_CONTINUOUS])


def trl_rewards(s: dict[str, Any]):
    """The VLM rows' rewards (:func:`vlm_reward_names`) as TRL reward functions: the same functions mmgrpo calls."""
    import mmgrpo.rewards.text  # noqa: F401  (registers the rewards)
    from mmgrpo.rewards.registry import get as get_reward

    fmt, acc = get_reward("format"), get_reward("accuracy")

    def text(completions):
        return [c[-1]["content"] if isinstance(c, list) else c for c in completions]

    def format_reward(completions, **kwargs):
        return [float(v) for v in fmt(text(completions), [None] * len(completions), [{}] * len(completions), None)]

    def accuracy_reward(completions, answer, **kwargs):
        meta = [{"answer": a} for a in answer]
        return [float(v) for v in acc(text(completions), [None] * len(completions), meta, None)]

    compress = text_compressibility()

    def compressibility_reward(completions, **kwargs):
        return compress(text(completions), None, None, None)

    funcs = [format_reward, accuracy_reward]
    return funcs + ([compressibility_reward] if VLM_CONTINUOUS in vlm_reward_names(s) else [])


def trl_checkpointing_field(config_cls) -> str:
    """The name of the activation-checkpointing switch of TRL's config (transformers renamed ``gradient_checkpointing``
    to ``activation_checkpointing``). The TRL side turns it off: ``GRPOConfig`` turns it on by default (each layer's
    forward recomputed in backward), mmgrpo's VLM policy does not (``policy.options.gradient_checkpointing``), and the
    two sides are to do equal work."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def vlm_trl(s: dict[str, Any], model_dir: str, run_dir: str, warm: int, steps: int, device: str = "cpu"):
    """A TRL GRPOTrainer; its ``train()`` runs warm-up + timed steps and the callback times them, then one more
    step under a :class:`ComputeMeter` (its seconds land in the returned list)."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmgrpo.policies.vlm_inputs import R1_SYSTEM_PROMPT, question_text

    rows = [{"prompt": [{"role": "system", "content": R1_SYSTEM_PROMPT},
                        {"role": "user", "content": question_text(p)}],
             "image": Image.fromarray(m["images"][0]), "answer": m["answer"]} for p, m in vlm_examples(s)]  # fmt: skip
    # without the hub's kernels, as mmgrpo loads it (NO_HUB_KERNELS): on a GPU, transformers' default would fetch
    # layers from the hub at the first train() (the GPU check's machine is offline) and run other layers than mmgrpo
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype="float32", use_kernels=False)
    model.model.visual.requires_grad_(False)  # as mmgrpo's freeze_vision (full fine-tuning of the language model)
    processor = AutoProcessor.from_pretrained(model_dir)
    n = s["B"] * s["G"]
    args = GRPOConfig(
        output_dir=run_dir, per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=s["G"],
        generation_batch_size=n, max_completion_length=s["tokens"], temperature=1.0, beta=0.0, learning_rate=1e-5,
        num_iterations=1, max_steps=warm + steps + 1, logging_steps=10**6, report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=device == "cpu", bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, log_completions=False, **{trl_checkpointing_field(GRPOConfig): False},
    )  # fmt: skip
    ends: list[float] = []
    lengths: list[float] = []
    metered: list[float] = []
    meter = ComputeMeter(device)

    class Clock(TrainerCallback):
        """Step ends (the first entry: the start of training) and each step's mean completion length; the step
        after the timed ones runs metered."""

        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            if len(ends) == warm + steps + 1:  # the metered step ends here
                meter.__exit__(None, None, None)
                metered.append(meter.seconds)
            ends.append(time.perf_counter())
            lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])
            if len(ends) == warm + steps + 1:  # the timed steps are done: meter the next one
                meter.__enter__()

    trainer = GRPOTrainer(model=model, reward_funcs=trl_rewards(s), args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[Clock()])  # fmt: skip
    return trainer, ends, lengths, n, metered


def rollout_module():
    """``bench/rollout.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).parent / "rollout.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)
    return ro


def rollout_job(s: dict[str, Any], repeats: int, device: str = "cpu") -> dict[str, Any]:
    ro = rollout_module()
    policy, pipe, max_len = ro.build(s["tiny"], device, "float32", s.get("guidance", 1.0))
    times = ro.measure(ro.calls(policy, pipe, max_len, device), repeats, device)
    return {"mmgrpo": times["rollout"], "peer": times["pipeline"], "rows": len(ro.PROMPTS) * ro.GROUP}


class ComputeMeter:
    """Seconds spent in neural-network work while active: the outermost ``nn.Module`` forward calls of the process
    (global module hooks, so the rollout's decode steps, the VAE, a reward model and layers called directly all
    count, nested calls once) plus ``torch.autograd.backward`` (which ``Tensor.backward`` and accelerate's
    ``backward`` call). mmgrpo's own modules (classes defined in the ``mmgrpo`` package, e.g. the VLM scorer, whose
    forward also runs the whole decode loop so that sharded weights are gathered for it) are transparent: the model
    modules called inside them count, their own Python does not. ``compute fraction`` = these seconds / the step's
    wall time: what is left is the framework's own Python, sampling logic, rewards and the optimizer step. The hooks
    cost a few microseconds per module call, so the metered step is an extra one after the timed steps. On CUDA the
    device is synchronised where a metered span starts and ends, so a span holds its kernels' execution, not only
    their launches (the waits make the metered step slower than a timed one; the fraction is of that step)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def _sync(self) -> None:
        synchronize(self.device)

    def __enter__(self) -> ComputeMeter:
        import torch
        from torch.nn.modules import module as nn_module

        self.seconds, self._depth, self._t = 0.0, 0, 0.0
        self._hooks = [nn_module.register_module_forward_pre_hook(self._pre),
                       nn_module.register_module_forward_hook(self._post)]  # fmt: skip
        self._backward = torch.autograd.backward

        def backward(*args, **kwargs):
            if self._depth == 0:
                self._sync()
            t0 = time.perf_counter()
            try:
                return self._backward(*args, **kwargs)
            finally:
                if self._depth == 0:  # not inside a metered forward
                    self._sync()
                    self.seconds += time.perf_counter() - t0

        torch.autograd.backward = backward
        return self

    @staticmethod
    def _framework(module) -> bool:
        return type(module).__module__.split(".")[0] == "mmgrpo"

    def _pre(self, module, args):
        if self._framework(module):
            return
        if self._depth == 0:
            self._sync()
            self._t = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output):
        if self._framework(module):
            return
        self._depth -= 1
        if self._depth == 0:
            self._sync()
            self.seconds += time.perf_counter() - self._t

    def __exit__(self, *exc) -> None:
        import torch

        for h in self._hooks:
            h.remove()
        torch.autograd.backward = self._backward


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a step's wall time holds its kernels."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    """The process's peak memory: resident set (``ru_maxrss``) on CPU, the CUDA caching allocator's peak of
    allocated tensors (``torch.cuda.max_memory_allocated``) on a GPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One side of one point: build, ``warmup`` steps, ``steps`` timed steps -> seconds per step, rows, extras."""
    import torch

    torch.manual_seed(0)
    s, side, fam = job["sizes"], job["side"], job["family"]
    warm, steps, device = job["warmup"], job["steps"], job.get("device", "cpu")
    out: dict[str, Any] = {"family": fam, "side": side, "sizes": s}
    two = job.get("cfg_forwards", 1) == 2  # mmgrpo's guidance as two forwards (before 2026-12-06)
    with tempfile.TemporaryDirectory() as tmp, rollout_module().two_guided_forwards() if two else nullcontext():
        if fam == "rollout":
            return {**out, **rollout_job(s, job["repeats"], device)}
        if fam == "vlm" and side == "trl":
            trainer, ends, lengths, rows, metered = vlm_trl(s, job["model"], tmp, warm, steps, device)
            trainer.train()
            durations = [b - a for a, b in zip(ends, ends[1:])][warm : warm + steps]
            extra = {"tokens_mean": lengths[warm + steps - 1] if lengths else None,
                     "trained_rows": float(rows),  # GRPOTrainer's loss covers every row (no zero-advantage filter)
                     "compute_fraction": metered[0] / (ends[-1] - ends[-2]) if metered else None}  # fmt: skip
        else:
            if fam == "vlm":
                step, rows = vlm_mmgrpo(s, job["model"], job["overrides"], tmp, device)
            elif side == "mmgrpo":
                step, rows = diffusion_mmgrpo(s, job["overrides"], tmp, device, job.get("model"))
            else:
                step, rows = diffusion_flow_grpo(s, device, job.get("model"))
            durations, trained, last = [], [], {}
            for i in range(warm + steps):
                t0 = time.perf_counter()
                last = step()
                synchronize(device)
                if i >= warm:
                    durations.append(time.perf_counter() - t0)
                    trained.append(last["trained_rows"])
            with ComputeMeter(device) as meter:  # one more step, metered
                t0 = time.perf_counter()
                step()
                synchronize(device)
                fraction = meter.seconds / (time.perf_counter() - t0)
            extra = {"tokens_mean": last.get("completion/length_mean"), "trained_rows": statistics.mean(trained),
                     "compute_fraction": fraction}  # fmt: skip
    return {**out, "s_per_step": durations, "rows": rows, **extra}


def worker(path: str) -> int:
    """Run the jobs of a JSON file in this process, one result line each (errors are results too)."""
    import traceback

    for job in json.loads(Path(path).read_text()):
        try:
            res = run_job(job)
        except Exception as e:  # noqa: BLE001  (the table shows it; the other jobs still run)
            res = {"family": job["family"], "side": job["side"], "sizes": job["sizes"],
                   "error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-2000:]}  # fmt: skip
        res["peak_mib"] = peak_mib(job.get("device", "cpu"))
        print(RESULT + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":  # bench/peers.py starts each worker process so
    sys.exit(worker(sys.argv[1]))
