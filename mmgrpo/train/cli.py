"""The ``mmgrpo`` command.

    mmgrpo train CONFIG [key=value ...]      train (or resume=RUN_DIR to continue a run)
    mmgrpo sample (--config CONFIG | --model PATH --family F) [--run RUN_DIR] --prompts ... --best-of N --reward R
                                             Best-of-N sampling (see mmgrpo.train.sample)
    mmgrpo list                              every pipeline, policy, reward, estimator and loss
    mmgrpo serve-reward NAME [...]           serve a reward over HTTP (see mmgrpo.rewards.server)
    mmgrpo --version

User errors print one paragraph without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import mmgrpo
from mmgrpo import rewards
from mmgrpo.core.advantages import COMBINERS, ESTIMATORS, SHAPERS
from mmgrpo.core.errors import UserError
from mmgrpo.core.losses import AGGREGATIONS, LOSSES
from mmgrpo.policies import POLICIES
from mmgrpo.rewards.server import main as serve_main
from mmgrpo.train.components import PIPELINES
from mmgrpo.train.config import load_config
from mmgrpo.train.sample import main as sample_main
from mmgrpo.train.signals import Interrupted
from mmgrpo.train.trainer import train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrpo", description="GRPO-style RL for image/video generators and VLMs")
    p.add_argument("--version", action="version", version=f"mmgrpo {mmgrpo.__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="train from a YAML config", description="mmgrpo train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML file (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=3e-4 resume=runs/x")
    sub.add_parser("list", help="list every registered pipeline, policy, reward, estimator and loss")
    b = sub.add_parser("sample", help="Best-of-N sampling with a (trained) generator", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser("serve-reward", help="serve a reward over HTTP", add_help=False)
    s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def cmd_train(config: str, overrides: list[str]) -> int:

    cfg = load_config(config, overrides)
    trainer = train(cfg)
    if trainer.acc.is_main_process:
        print(f"run directory: {trainer.run_dir} (report: {trainer.run_dir / 'report.html'})")
    return 0


def list_entries() -> dict[str, dict[str, str]]:
    """{section: {name: one-line description}} for everything registered."""

    PIPELINES.load()
    sections = {
        "pipelines": PIPELINES,
        "estimators": ESTIMATORS,
        "reward shaping": SHAPERS,
        "reward combination": COMBINERS,
        "losses": LOSSES,
        "loss aggregation": AGGREGATIONS,
    }
    out = {name: {n: reg.describe(n) for n in reg.names()} for name, reg in sections.items()}
    out["pipelines"] = {n: PIPELINES.get(n).description for n in PIPELINES.names()}
    out["policies"] = _policies()
    out["rewards"] = rewards.available()
    for extra in ("mmgrpo.policies.sde:SDE_KINDS", "mmgrpo.policies.exploration:EXPLORATION"):
        module, _, attr = extra.partition(":")
        try:
            reg = getattr(__import__(module, fromlist=[attr]), attr)
        except (ImportError, AttributeError):
            continue
        out["sde dynamics" if "sde" in module else "exploration"] = {n: reg.describe(n) for n in reg.names()}
    return out


def _policies() -> dict[str, str]:

    return {n: POLICIES.describe(n) for n in POLICIES.names()}


def cmd_list() -> int:
    for section, entries in list_entries().items():
        print(f"{section}:")
        width = max((len(n) for n in entries), default=0)
        for name, desc in entries.items():
            print(f"  {name.ljust(width)}  {desc}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MMGRPO_DEBUG") == "1"
    try:
        rest = [a for a in argv if a != "--debug"]
        if rest and rest[0] == "serve-reward":  # its own parser (mmgrpo.rewards.server) takes every argument
            return serve_main(rest[1:])
        if rest and rest[0] == "sample":  # its own parser (mmgrpo.train.sample) takes every argument
            return sample_main(rest[1:])
        args = _parser().parse_args(argv)
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command == "list":
            return cmd_list()
        _parser().print_help()
        return 2
    except UserError as e:
        if debug:
            raise
        msg = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"error: {msg}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted (the step was abandoned; the checkpoints already written are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
