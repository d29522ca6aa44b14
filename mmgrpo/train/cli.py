"""The ``mmgrpo`` command.

    mmgrpo train CONFIG [key=value ...]      train (or resume=RUN_DIR to continue a run)
    mmgrpo sample (--config CONFIG | --model PATH --family F) [--run RUN_DIR] --prompts ... --best-of N --reward R
                                             Best-of-N sampling (see mmgrpo.train.sample)
    mmgrpo export RUN [--step N] --out DIR [--merge] [--ema]
                                             diffusers / peft / transformers files (see mmgrpo.train.export)
    mmgrpo list                              every registered part of every kind (built-in and plug-in)
    mmgrpo serve-reward NAME [...]           serve a reward over HTTP (see mmgrpo.rewards.server)
    mmgrpo --version

User errors print one paragraph without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mmgrpo
from mmgrpo.core import plugins
from mmgrpo.core.errors import UserError, as_shown
from mmgrpo.core.registry import registries
from mmgrpo.rewards.server import main as serve_main
from mmgrpo.train.accelerator import quiet_deepspeed_probe
from mmgrpo.train.components import PIPELINES
from mmgrpo.train.config import load_config
from mmgrpo.train.export import main as export_main
from mmgrpo.train.report import eval_summary, read_metrics
from mmgrpo.train.sample import main as sample_main
from mmgrpo.train.signals import Interrupted, last_words
from mmgrpo.train.trainer import train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrpo", description="GRPO-style RL for image/video generators and VLMs")
    p.add_argument("--version", action="version", version=f"mmgrpo {mmgrpo.__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="train from a YAML config", description="mmgrpo train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML file (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=3e-4 resume=runs/x")
    sub.add_parser("list", help="list every registered part of every kind (recipes, rewards, losses, families...)")
    b = sub.add_parser("sample", help="Best-of-N sampling with a (trained) generator", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    e = sub.add_parser("export", help="write a run's weights for diffusers / peft / transformers", add_help=False)
    e.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser("serve-reward", help="serve a reward over HTTP", add_help=False)
    s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def cmd_train(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    trainer = train(cfg)
    if trainer.acc.is_main_process:
        for line in eval_summary(read_metrics(trainer.run_dir / "metrics.jsonl")):  # the held-out scores
            print(line)
        print(f"run directory: {trainer.run_dir} (report: {trainer.run_dir / 'report.html'})")
    close_processes(trainer.acc)
    return 0


def close_processes(acc) -> None:
    """Several processes: all of them reach the end, then the process group is destroyed, so its communication
    threads end in order before the interpreter tears the process down (without it, a rank that left first now and
    then aborted in a destructor, "terminate called without an active exception", failing a finished run)."""
    import torch.distributed as dist

    if acc.num_processes > 1 and dist.is_available() and dist.is_initialized():
        acc.wait_for_everyone()
        dist.destroy_process_group()


TITLES: dict[str, str] = {
    "pipelines": "pipelines (recipes)",
    "rewards": "rewards",
    "estimators": "advantage estimators",
    "shaping": "reward shaping",
    "combine": "reward combination",
    "losses": "policy losses",
    "aggregations": "loss aggregations",
    "diffusion_families": "diffusion model families",
    "vlm_families": "VLM model families",
    "sde": "SDE dynamics",
    "exploration": "exploration schedules",
    "diffusion_objectives": "diffusion objectives",
    "methods": "paper methods",
    "rewriters": "prompt rewriters (re-rolls of groups without learning signal)",
    "samplers": "prompt samplers",
}
"""plug-in kind -> heading in ``mmgrpo list`` (a kind missing here is shown under its own name)"""


def list_entries() -> dict[str, dict[str, str]]:
    """{plug-in kind: {name: one-line description}} for every kind of :data:`mmgrpo.core.plugins.BUILTIN` and every
    registry created with ``plugins=``, walked generically (built-ins and entry points), plus ``policies``: the
    options schema of each recipe's policy."""
    regs = registries()
    out: dict[str, dict[str, str]] = {}
    for kind in [*plugins.BUILTIN, *(k for k in regs if k not in plugins.BUILTIN)]:
        reg = regs.get(kind)
        out[kind] = {n: reg.describe(n) for n in reg.names()} if reg is not None else {}
    out["policies"] = _policies()
    return out


def _policies() -> dict[str, str]:
    """recipe -> the policy options it takes (``policy.options``): the recipes build their policies, so this is
    the real list of what a config can train."""
    out = {}
    for name in PIPELINES.names():
        cls = PIPELINES.get(name).policy_options
        if cls is not None:
            out[name] = f"policy.options: {cls.__module__}.{cls.__qualname__}"
    return out


def cmd_list() -> int:
    for kind, entries in list_entries().items():
        print(f"{TITLES.get(kind, kind)} [{kind}]:")
        width = max((len(n) for n in entries), default=0)
        for name, desc in entries.items():
            print(f"  {name.ljust(width)}  {desc}")
        print()
    return 0


def paragraph(text: str) -> str:
    """A message as the CLI prints it (:func:`~mmgrpo.core.errors.as_shown`): its first line wrapped to 100 columns,
    words and hyphenated names kept whole; the lines after it (a YAML error's lines with their carets) as they are."""
    return as_shown(text)


@contextmanager
def short_warnings() -> Iterator[None]:
    """Inside: mmgrpo's own warnings (raised from a file of the mmgrpo package) print as ``warning: <message>``,
    each message once, instead of Python's ``.../text_to_image.py:133: UserWarning: ...`` followed by the source
    line; through ``tqdm.write``, so they land above a progress bar instead of inside it. Other packages' warnings
    (and a plug-in's own) keep Python's format. Only the CLI's :func:`main` enters this: a library caller keeps
    Python's display."""
    package = Path(mmgrpo.__file__).resolve().parent
    seen: set[str] = set()
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        python_format = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
            try:
                ours = Path(filename).resolve().is_relative_to(package)
            except (OSError, ValueError):
                ours = False
            if not ours:
                return python_format(message, category, filename, lineno, file, line)
            text = str(message)
            if text not in seen:
                seen.add(text)
                from tqdm.auto import tqdm

                tqdm.write(f"warning: {paragraph(text)}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """The ``mmgrpo`` command. Called with no ``argv`` (the console script), an error that is not mmgrpo's (or any
    under ``--debug``) prints its traceback inside :func:`last_words` and returns 1, as Python's own exit would:
    printed by the interpreter on the way out, a launcher's SIGTERM after a failed step could cut it. Called with
    ``argv`` (a library caller, the tests), the error propagates."""
    cli = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    with short_warnings(), last_words():  # a launcher's SIGTERM after a failed step waits for the message below
        try:
            return _main(argv)
        except Exception:
            if not cli:
                raise
            traceback.print_exc()
            return 1


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv or os.environ.get("MMGRPO_DEBUG") == "1"
    quiet_deepspeed_probe()
    try:
        rest = [a for a in argv if a != "--debug"]
        if rest and rest[0] == "serve-reward":  # its own parser (mmgrpo.rewards.server) takes every argument
            return serve_main(rest[1:])
        if rest and rest[0] == "sample":  # its own parser (mmgrpo.train.sample) takes every argument
            return sample_main(rest[1:])
        if rest and rest[0] == "export":  # its own parser (mmgrpo.train.export)
            return export_main(rest[1:])
        args = _parser().parse_args(rest)  # --debug anywhere, as every error message suggests
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command == "list":
            return cmd_list()
        _parser().print_help()
        return 2
    except UserError as e:
        if debug:
            raise
        print(f"error: {paragraph(str(e))}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("interrupted (the step was abandoned; the checkpoints already written are kept)", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):  # e.g. a new run's directory removed: nothing had been trained
            print(note, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
