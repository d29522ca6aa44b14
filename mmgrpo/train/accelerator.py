"""The processes of a run and their ``Accelerator``: the launcher's mixed precision reconciled with the config's, FSDP
and DeepSpeed on CPU (gloo) processes, and the optimizer kernel the parameters allow (the trainer builds its
accelerator with :func:`make_accelerator` unless it is given one)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from mmgrpo.core.errors import UserError


def quiet_deepspeed_probe() -> None:
    """On a machine with no accelerator torch can use, tell DeepSpeed so (``DS_ACCELERATOR=cpu``) before anything
    imports it: accelerate imports DeepSpeed wherever it is installed (each ``unwrap_model``, which transformers'
    ``save_pretrained`` calls), and DeepSpeed's probe for an accelerator then prints "Setting accelerator to CPU. If
    you have GPU or other accelerator, we were unable to detect it." on every command. A value the user set is kept;
    with a GPU (CUDA, XPU, MPS) nothing is set, so DeepSpeed detects it as before."""
    if "DS_ACCELERATOR" in os.environ:
        return
    xpu = getattr(torch, "xpu", None)
    if torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


COLLECTIVE_TIMEOUT = timedelta(minutes=60)
"""how long a process waits in a collective: the main process alone writes, hashes and exports a checkpoint (a
multi-billion-parameter model takes minutes) while the others wait; NCCL's own default, 10 minutes, would abort the
run there"""


def make_accelerator(mixed_precision: str | None) -> Accelerator:
    """An Accelerator with :func:`launch_precision`; in a plain (non-launched) process a previous one's settings are
    reset first. A launch that started several processes but left each alone (no accelerator found and no
    ``ACCELERATE_USE_CPU=true``) is an error, and FSDP asked for on CPU processes runs (:func:`enable_cpu_fsdp`)."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)
    wait = InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)
    acc = Accelerator(mixed_precision=launch_precision(mixed_precision), kwargs_handlers=[wait])
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and acc.num_processes == 1:
        raise UserError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}), but accelerate found no GPU and "
            "made each a separate 1-process run (they would overwrite each other's run directory). For processes "
            "on CPU, launch with the environment variable ACCELERATE_USE_CPU=true (gloo); on GPUs, check that torch "
            "sees them (torch.cuda.is_available())"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type == "MULTI_CPU":
        enable_cpu_fsdp(str(acc.mixed_precision))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and acc.distributed_type == "MULTI_CPU":
        enable_cpu_deepspeed(str(acc.mixed_precision))
    return acc


def enable_cpu_fsdp(mixed_precision: str = "no") -> None:
    """Turn a gloo (CPU) process group's accelerate state into FSDP, with the plugin the launcher's FSDP options
    (``accelerate launch --config_file configs/accelerate/fsdp.yaml``) describe.

    accelerate enables FSDP only for accelerator devices and silently runs a CPU launch as plain data parallel;
    torch's FSDP2 (``fully_shard``) itself shards on a CPU device mesh over gloo, which is how the 2-process tests
    run the sharded code path (accelerate's FSDP2 preparation, sharded checkpoints) without a GPU. In float32 only:
    accelerate gives the plugin the launch's mixed precision only when it enables FSDP itself, so a bf16 launch
    trained in float32 while config.yaml recorded bf16 (a resume on one process then computed in bf16)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set from the config file
    if plugin.fsdp_version != 2:
        raise UserError(
            f"FSDP on CPU processes needs FSDP2 (fsdp_version: 2 in the accelerate config), got fsdp_version "
            f"{plugin.fsdp_version}; use configs/accelerate/fsdp.yaml"
        )
    if not hasattr(torch.cpu.Stream, "record_event"):  # torch 2.6: FSDP2's all-gather failed in the first forward
        raise UserError(
            f"FSDP on CPU processes needs a torch whose CPU streams record events (FSDP2's collectives call "
            f"torch.cpu.Stream.record_event), which torch {torch.__version__} lacks; upgrade torch (2.11 and 2.14 "
            "run it), or launch on GPUs"
        )
    if mixed_precision != "no":
        raise UserError(
            f"FSDP on CPU processes runs in float32 only (mixed precision {mixed_precision}: the launcher's, which "
            "configs/accelerate/fsdp.yaml sets for GPUs, or the config's trainer.mixed_precision); launch with "
            "--mixed_precision no and leave trainer.mixed_precision unset (or no), or run on GPUs"
        )
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def enable_cpu_deepspeed(mixed_precision: str) -> None:
    """Turn a gloo (CPU) process group's accelerate state into DeepSpeed, with the plugin the launcher's DeepSpeed
    options (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``) describe.

    accelerate enables DeepSpeed only for accelerator devices (with ``ACCELERATE_USE_CPU=true`` it runs the launch as
    plain data parallel); DeepSpeed itself runs ZeRO-2 and ZeRO-3 on CPU processes (its CPU accelerator,
    ``DS_ACCELERATOR=cpu``, over the gloo group accelerate made), which is how the 2-process tests run the DeepSpeed
    code path without a GPU."""
    from accelerate import DeepSpeedPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no CUDA probing
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"the launcher asks for DeepSpeed (accelerate config distributed_type: DEEPSPEED), but it cannot be "
            f"imported ({e}); install it (pip install 'mmgrpo[deepspeed]') or launch with configs/accelerate/fsdp.yaml"
        ) from e
    if mixed_precision != "no":
        raise UserError(
            f"DeepSpeed on CPU processes runs in float32 only (mixed precision {mixed_precision}: the launcher's, "
            "which the DeepSpeed configs set for GPUs, or the config's trainer.mixed_precision); launch with "
            "--mixed_precision no and leave trainer.mixed_precision unset (or no), or run on GPUs"
        )
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher set from the config file
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["deepspeed_plugins"] = plugin


def launch_precision(configured: str | None) -> str:
    """The mixed precision of a run: the config's ``trainer.mixed_precision`` when set, else the launcher's
    (``accelerate launch --mixed_precision`` and accelerate's config file set ``ACCELERATE_MIXED_PRECISION``), else
    "no". A launcher asking for bf16/fp16 and a config asking for something else is a UserError naming both (the
    launcher writes "no" when nothing was asked, so "no" there is no request)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if configured is None:
        return launched
    if launched != "no" and launched != configured:
        raise UserError(
            f"trainer.mixed_precision={configured} in the config, but the launcher asks for {launched} (accelerate "
            f"launch --mixed_precision {launched}, or accelerate's config file). Say it once: remove "
            f"trainer.mixed_precision from the config to use the launcher's, or launch with --mixed_precision "
            f"{configured}"
        )
    return configured


def check_fp16_params(acc: Accelerator, params: list[torch.Tensor]) -> None:
    """Refuse float16 trainable parameters under fp16 mixed precision: its gradient scaler cannot unscale their
    gradients (full fine-tuning of float16 weights; LoRA adapters are fp32)."""
    if str(acc.mixed_precision) == "fp16" and any(p.dtype == torch.float16 for p in params):
        raise UserError(
            "trainer.mixed_precision=fp16 (or the launcher's --mixed_precision fp16) trains with a gradient "
            "scaler, which cannot unscale the gradients of float16 trainable parameters (torch.float16: every "
            "float16 weight is trained): load the weights in float32 (policy.options.dtype: float32) and keep fp16 "
            "mixed precision, train LoRA adapters (fp32), or use bf16 (policy.options.dtype: bfloat16 or "
            "trainer.mixed_precision=bf16)"
        )


def optimizer_kernel(params: list[torch.Tensor], distributed_type: Any) -> dict[str, bool]:
    """AdamW's fused kernel (one pass over each parameter's weight, gradient and moments) where torch has it for
    every parameter's device and dtype and the parameters stay plain tensors; else torch's default choice. On CPU
    torch's default is the single-tensor loop (six passes; on the tiny VLM of ``bench/peers.py`` ~20x slower than
    fused). FSDP turns the parameters into DTensors after this point, and DeepSpeed steps its own flat partitions, so
    both keep the default. Results equal the loop's within float32 rounding (the same formula, fewer roundings of
    intermediates)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    ok = distributed_type not in ("FSDP", "DEEPSPEED") and all(
        p.device.type in _get_fused_kernels_supported_devices() and p.dtype in floats and type(p) in (
            torch.Tensor, torch.nn.Parameter) for p in params
    )  # fmt: skip
    return {"fused": True} if ok else {}
