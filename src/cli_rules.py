"""``tensortap rules``: run built-in rules on a trial, offline or alongside a training.

::

    tensortap rules PATH --rule loss_not_decreasing --rule vanishing_gradient:threshold=1e-6
                         [--follow] [--stop-training] [--json]
    tensortap rules --list

Prints one line per rule: the steps where it fired as ranges, with the reason
at the first; or that it did not fire; or that it found none of its inputs.
Exit status: 0 no rule fired, 1 a rule fired, 2 a usage error, no trial at
PATH, no step to judge, or a rule that found none of its inputs; 130 when
interrupted (Ctrl-C during ``--follow``), after printing what was evaluated.
With ``--follow``, a storage that fails (refuses connections, answers HTTP 5xx,
does not answer) is tried again for up to :data:`FOLLOW_OUTAGE_SECONDS`, then
exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from .cli import (
    EXIT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    Style,
    add_json_argument,
    add_trial_arguments,
    count,
    error_json,
    interrupted,
    logger,
    open_trial,
    print_json,
    printable,
    step_ranges,
    usage_after_output,
)
from .exceptions import RuleInputsMissing, UnknownName, UsageError
from .trial.rules import BUILTIN_RULES, Rule, RuleRunner, StopTraining, Verdict, make_rule, parameters
from .trial.rules.runner import rule_labels, rule_status
from .trial.views import failure_notes, killed_note, killed_workers

FOLLOW_OUTAGE_SECONDS = 120.0
"""How long ``--follow`` tries again a storage that fails before it gives up (exit 2): longer than a training's
writer retries the same failures by default (90% of ``ShardPolicy.timeout``: 54 s), so the follower outlives any
outage the training rides out."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rules`` subcommand to ``subparsers`` (the ``tensortap`` command's)."""
    p = subparsers.add_parser(
        "rules",
        help="run rules on a trial; exit 1 if one fires",
        description="Run built-in rules on a trial. Exit status: 0 nothing fired, 1 a rule fired, 2 usage or "
        "input error (no trial, a rule that found none of its inputs), 130 interrupted.",
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
    p.add_argument(
        "--follow",
        action="store_true",
        help="run alongside the training until it ends (a storage that fails is tried again for up to "
        f"{FOLLOW_OUTAGE_SECONDS:g} s)",
    )
    p.add_argument("--stop-training", action="store_true", help="ask the training to stop when a rule fires")
    p.add_argument("--start-step", type=int, help="first global step to evaluate (default 0)")
    p.add_argument("--end-step", type=int, help="stop before this global step")
    p.add_argument(
        "--idle-timeout", type=float, help="with --follow: give up after this many seconds without a new step"
    )
    add_json_argument(p, "docs/rules.md")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------- --list
def plain(text: str) -> str:
    """reStructuredText of a docstring as plain text: roles, literals and emphasis markup removed."""
    text = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"\1", text)  # :class:`~a.b.C` -> C
    text = re.sub(r":\w+:`([^`<]+?)\s*(?:<[^>]*>)?`", r"\1", text)  # :meth:`x` / :ref:`t <x>` -> x / t
    text = text.replace("``", "")
    return re.sub(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])", r"\1", text)


def rule_doc(cls: type[Rule]) -> tuple[str, dict[str, str]]:
    """A rule's summary (first paragraph) and its parameters' descriptions, as plain text."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    params: dict[str, str] = {}
    section = re.search(r"^Parameters\n-+\n(.*?)(?:\n\n\S[^\n]*\n-+\n|\Z)", doc, re.S | re.M)
    current = None
    for line in (section.group(1) if section else "").splitlines():
        if line and not line[0].isspace():
            current = line.split(":")[0].strip()
            params[current] = ""
        elif current is not None and line.strip():
            params[current] = f"{params[current]} {line.strip()}".strip()
    return plain(summary), {k: plain(v) for k, v in params.items()}


def _list(as_json: bool) -> int:
    entries: list[dict[str, Any]] = []
    signatures = {name: parameters(cls) for name, cls in BUILTIN_RULES.items()}
    for name, cls in BUILTIN_RULES.items():
        summary, described = rule_doc(cls)
        entries.append(
            {
                "name": name,
                "class": cls.__name__,
                "summary": summary,
                "parameters": [
                    {
                        "name": p.name,
                        "required": p.default is inspect.Parameter.empty,
                        "default": _json_default(p.default),
                        "type": p.annotation,
                        "description": described.get(p.name, ""),
                    }
                    for p in signatures[name]
                ],
            }
        )
    if as_json:
        print_json(entries)
        return EXIT_OK
    style = Style(sys.stdout)
    for e in entries:
        print(f"{style(e['name'], 'bold')} ({e['class']}): {e['summary']}")
        for p, param in zip(e["parameters"], signatures[e["name"]], strict=True):
            default = "required" if p["required"] else repr(param.default)
            print(f"    {p['name']}={default} ({p['type']})" + (f": {p['description']}" if p["description"] else ""))
        print()
    return EXIT_OK


def _json_default(value: object) -> object:
    """A parameter's default as a JSON value (a tuple as a list; None, also for a required parameter, as null);
    its ``repr`` where JSON has no such value (an infinity, an object)."""
    if value is inspect.Parameter.empty:
        return None
    value = list(value) if isinstance(value, tuple) else value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


# ---------------------------------------------------------------- running
def _skipped(rule: Rule) -> str:
    """``"; 3 steps skipped (3-5): their shards cannot be read"``, or nothing when the rule skipped none."""
    steps = rule.skipped_steps
    if not steps:
        return ""
    return f"; {count(len(steps), 'step')} skipped ({step_ranges(steps)}): their shards cannot be read"


def _rule_line(
    rule: Rule, label: str, verdicts: list[Verdict], saved: list[int], missing: list[str] | None, style: Style
) -> str:
    """The text line of ``rule``, which starts with ``label`` (its name, or its name and spec)."""
    if missing is not None:
        needs = "; ".join(m.removeprefix(f"{rule.name} ") for m in missing)
        return f"{label}: {style('found none of its inputs', 'yellow')}: it {printable(needs, message=True)}"
    if verdicts:
        steps = [v.step for v in verdicts]
        first = verdicts[0]
        return (
            f"{label}: {style('fired', 'red')} at {step_ranges(steps, saved)} ({count(len(steps), 'step')}); "
            f"at step {first.step}: {printable(first.reason, message=True)}{_skipped(rule)}"
        )
    where = (
        f"{count(rule.evaluated_steps, 'step')} up to step {rule.last_step}"
        if rule.last_step >= 0
        else "no step evaluated"
    )
    return f"{label}: {style('did not fire', 'green')} ({where}{_skipped(rule)})"


def _check_options(args: argparse.Namespace) -> None:
    """Refuse a negative ``--start-step``, ``--end-step`` or ``--idle-timeout`` (:class:`UsageError`)."""
    for flag, value, what in (
        ("--start-step", args.start_step, "a step"),
        ("--end-step", args.end_step, "a step"),
        ("--idle-timeout", args.idle_timeout, "seconds"),
    ):
        if value is not None and not value >= 0:
            raise UsageError(f"{flag}: expected {what} >= 0, got {value:g}")


def build_rules(specs: Sequence[str], trial: Any) -> list[Rule]:
    """The built-in rules ``specs`` (``NAME[:PARAM=VALUE,...]``) on ``trial``.

    Parameters
    ----------
    specs
        Rule specifications, as given to ``--rule``.
    trial
        The trial the rules judge.

    Returns
    -------
    list of Rule
        One rule per spec, in order.

    Raises
    ------
    UnknownName
        An unknown rule or parameter, with suggestions (``--json`` kind ``unknown_name``).
    UsageError
        A spec that is not ``NAME[:PARAM=VALUE,...]`` or a parameter value the rule refuses (of the
        wrong type, out of range), naming the spec (kind ``usage``). Either way the commands exit 2
        with its message before doing anything else.
    """
    rules = []
    for spec in specs:
        try:
            rules.append(make_rule(spec, trial))
        except UnknownName:
            raise
        except (TypeError, ValueError) as exc:  # TypeError: a parameter value the rule refuses
            raise UsageError(f"--rule {spec!r}: {exc}") from None
    return rules


def run(args: argparse.Namespace) -> int:
    """Run the ``rules`` subcommand; return the exit status."""
    if args.list:
        given = (
            ("PATH", args.path),
            ("--rule", args.rule),
            ("--follow", args.follow),
            ("--stop-training", args.stop_training),
            ("--start-step", args.start_step is not None),
            ("--end-step", args.end_step is not None),
            ("--idle-timeout", args.idle_timeout is not None),
        )
        if ignored := [what for what, is_given in given if is_given]:
            logger.warning(
                "tensortap rules: --list lists the built-in rules and reads no trial: %s ignored",
                ", ".join(ignored),
            )
        return _list(args.json)
    if not args.path:
        raise UsageError("PATH is required (or use --list)")
    if not args.rule:
        raise UsageError(f"give at least one --rule; built-in rules: {', '.join(BUILTIN_RULES)}")
    _check_options(args)
    if args.idle_timeout is not None and not args.follow:
        logger.warning("tensortap rules: --idle-timeout is for --follow (a run that waits for steps): ignored")
    trial = open_trial(args, wait=args.follow, timeout=args.idle_timeout)
    rules = build_rules(args.rule, trial)  # a bad spec: exit 2 (with --json, the error object)
    actions = [StopTraining()] if args.stop_training else []
    verdicts: dict[Rule, list[Verdict]] = {r: [] for r in rules}
    style = Style(sys.stdout)

    def report(rule: Rule, verdict: Verdict) -> None:
        verdicts[rule].append(verdict)  # first: a Ctrl-C during the print below must not lose it
        if args.follow and not args.json and len(verdicts[rule]) == 1:
            print(
                f"{rule.name} {style('fired', 'red')} at step {verdict.step}: "
                f"{printable(verdict.reason, message=True)}",
                flush=True,
            )

    runner = RuleRunner(trial, rules, actions)
    was_interrupted = False
    try:
        runner.run(
            args.start_step,
            args.end_step,
            wait=args.follow,
            idle_timeout=args.idle_timeout,
            on_verdict=report,
            show_progress=None,
            outage=FOLLOW_OUTAGE_SECONDS,
        )
    except RuleInputsMissing:
        pass  # runner.lacking() below
    except KeyboardInterrupt:
        was_interrupted = True
    missing = runner.lacking()  # by rule, not name: two --rule of one built-in share its name
    if killed := killed_workers(trial):
        logger.warning(
            "tensortap rules: %s: its process ended without writing its end marker (SIGKILL, a crash); "
            "steps it had not published are lost",
            killed_note(killed),
        )
    for note in failure_notes(trial):  # the training failed: the rules judged what it published
        logger.warning("tensortap rules: %s", note)
    saved = trial.steps()
    fired = any(verdicts.values())
    problem = None if was_interrupted else run_problem(trial, rules, args.start_step, args.end_step, args.follow)
    if args.json:
        result = {
            "path": trial.path,
            "training_ended": trial.training_ended,
            "interrupted": was_interrupted,
            "fired": fired,
            "inputs_missing": bool(missing),
            "stop_request": trial.stop_request(),
            "rules": [
                {
                    "rule": r.name,
                    "spec": spec,
                    "status": rule_status(r),
                    "last_step": r.last_step,
                    "evaluated_steps": r.evaluated_steps,
                    "skipped_steps": r.skipped_steps,
                    "fired_steps": [v.step for v in verdicts[r]],
                    "fired_ranges": step_ranges([v.step for v in verdicts[r]], saved, limit=sys.maxsize),
                    "verdicts": [v.to_json() for v in verdicts[r]],
                    "missing_inputs": list(r.missing_inputs),
                }
                for r, spec in zip(rules, args.rule, strict=True)
            ],
        }
        if problem is not None:  # exit 2: the result, and the error every --json command gives then
            result.update(error_json("rules", problem, "input"))
        print_json(result)
    else:
        specs = [f"({printable(spec, message=True)})" for spec in args.rule]
        for r, label in zip(rules, rule_labels(rules, specs), strict=True):
            print(_rule_line(r, label, verdicts[r], saved, missing.get(r), style))
    if was_interrupted:
        return interrupted("rules", json=False)  # the result said so
    if missing:
        return EXIT_USAGE  # the rule lines said which inputs
    if problem is not None:
        return usage_after_output("rules", problem)
    return EXIT_FOUND if fired else EXIT_OK


def run_problem(
    trial: Any,
    rules: Sequence[Rule],
    start: int | None = None,
    end: int | None = None,
    follow: bool | None = None,
) -> str | None:
    """Why a run of ``rules`` on ``trial`` judged nothing, for which ``rules`` and ``report`` exit 2, or None.

    Parameters
    ----------
    trial
        The trial the rules ran on.
    rules
        The rules, after their run.
    start, end
        The run's ``--start-step`` and ``--end-step``, if given.
    follow
        Whether the run followed the training (``--follow``); None: the command cannot (``report``).

    Returns
    -------
    str or None
        What a rule that found none of its inputs needs (:func:`~tensortap.trial.rules.runner.rule_status`
        ``inputs_missing``), or why no step was judged (no complete step, none readable, none in the range).
    """
    path = trial.path
    missing = [m for r in rules if rule_status(r) == "inputs_missing" for m in r.missing_inputs]
    if missing:
        return "; ".join(missing)
    if any(r.evaluated_steps for r in rules):
        return None
    if any(r.skipped_steps for r in rules):
        return f"no step of {path} could be read: the shards of every step are damaged"
    saved = trial.steps()
    if saved and (start is not None or end is not None):
        where = " ".join(
            part
            for part in (
                f"from step {start}" if start is not None else "",
                f"before step {end}" if end is not None else "",
            )
            if part
        )
        return f"no step {where} in {path} (its steps: {step_ranges(saved, saved)})"
    if trial.training_ended:  # --follow ends then too, with or without an idle timeout
        return f"no complete step to judge in {path}: the training ended without saving one"
    if follow:
        return f"no complete step to judge in {path} before the idle timeout"
    hint = "" if follow is None else " (is the training still starting? use --follow)"
    return f"no complete step to judge in {path}{hint}"


PARSERS = [add_parser]
