"""``tensortap rules``: run built-in rules on a trial, offline or alongside a training.

::

    tensortap rules PATH --rule loss_not_decreasing --rule vanishing_gradient:threshold=1e-6
                         [--follow] [--stop-training] [--json]
    tensortap rules --list

Exit status: 0 when no rule fired, 1 when one did, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cli import add_trial_arguments
from .trial import create_trial
from .trial.rules import BUILTIN_RULES, Rule, RuleRunner, StopTraining, Verdict, make_rule, parameters


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rules`` subcommand to ``subparsers`` (the ``tensortap`` command's)."""
    p = subparsers.add_parser(
        "rules",
        help="run rules on a trial; exit 1 if one fires",
        description="Run built-in rules on a trial. Exit status: 0 nothing fired, 1 a rule fired, 2 usage error.",
    )
    add_trial_arguments(p, path_nargs="?")
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME[:PARAM=VALUE,...]",
        help="a built-in rule, e.g. vanishing_gradient:threshold=1e-6 (repeatable; see --list)",
    )
    p.add_argument("--list", action="store_true", help="list the built-in rules with their parameters")
    p.add_argument("--follow", action="store_true", help="run alongside the training until it ends")
    p.add_argument("--stop-training", action="store_true", help="ask the training to stop when a rule fires")
    p.add_argument("--start-step", type=int, help="first global step to evaluate (default 0)")
    p.add_argument("--end-step", type=int, help="stop before this global step")
    p.add_argument(
        "--idle-timeout", type=float, help="with --follow: give up after this many seconds without a new step"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
    return p


def _list(as_json: bool) -> int:
    entries: list[dict[str, Any]] = []
    for name, cls in BUILTIN_RULES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        entries.append(
            {
                "name": name,
                "class": cls.__name__,
                "summary": doc,
                "parameters": [
                    {"name": p.name, "default": repr(p.default), "type": p.annotation} for p in parameters(cls)
                ],
            }
        )
    if as_json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        print(f"{e['name']} ({e['class']}): {e['summary']}")
        for p in e["parameters"]:
            print(f"    {p['name']}={p['default']}  ({p['type']})")
    return 0


def _usage(message: str) -> int:
    print(f"tensortap rules: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the ``rules`` subcommand; return the exit status."""
    if args.list:
        return _list(args.json)
    if not args.path:
        return _usage("PATH is required (or use --list)")
    if not args.rule:
        return _usage(f"give at least one --rule; built-in rules: {', '.join(BUILTIN_RULES)}")
    trial = create_trial(args.path, wait=args.follow, timeout=args.idle_timeout, storage_options=args.storage_options)
    try:
        rules = [make_rule(spec, trial) for spec in args.rule]
    except (ValueError, TypeError) as exc:
        return _usage(str(exc))
    actions = [StopTraining()] if args.stop_training else []
    verdicts: dict[Rule, list[Verdict]] = {r: [] for r in rules}

    def report(rule: Rule, verdict: Verdict) -> None:
        verdicts[rule].append(verdict)
        if not args.json:
            print(f"{rule.name} fired at step {verdict.step}: {verdict.reason}", flush=True)

    RuleRunner(trial, rules, actions).run(
        args.start_step, args.end_step, wait=args.follow, idle_timeout=args.idle_timeout, on_verdict=report
    )
    fired = any(verdicts.values())
    if args.json:
        print(
            json.dumps(
                {
                    "path": trial.path,
                    "training_ended": trial.training_ended,
                    "fired": fired,
                    "stop_request": trial.stop_request(),
                    "rules": [
                        {
                            "rule": r.name,
                            "spec": spec,
                            "last_step": r.last_step,
                            "fired_steps": [v.step for v in verdicts[r]],
                            "verdicts": [v.to_json() for v in verdicts[r]],
                            "missing_inputs": list(r.missing_inputs),
                        }
                        for r, spec in zip(rules, args.rule, strict=True)
                    ],
                },
                indent=2,
            )
        )
    else:
        for r in rules:
            steps = [v.step for v in verdicts[r]]
            summary = f"fired at {len(steps)} step(s)" if steps else "did not fire"
            print(f"{r.name}: {summary} (evaluated up to step {r.last_step})")
            for message in r.missing_inputs:
                print(f"  {message}")
    return 1 if fired else 0
