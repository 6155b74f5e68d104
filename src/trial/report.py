"""``tensortap report``: one self-contained HTML page about a trial (plots embedded as data URIs).

Sections: the trial summary, loss and metric curves, then for a neural network
gradient norms per layer and weight and gradient distributions over steps, for
XGBoost the features' importance over rounds, and the verdicts of the rules
(:func:`default_rules`) with their reasons. A section that cannot be drawn says
why instead of disappearing.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..exceptions import TensortapError
from .export import check_output, written_whole
from .progress import progress
from .views import frameworks, html_text, trial_html

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .rules import Rule, Verdict
    from .trial import Tensor, Trial

DEFAULT_RULES = (
    "loss_not_decreasing",
    "vanishing_gradient",
    "exploding_tensor",
    "poor_weight_initialization",
    "all_zero",
)
"""Rules the report runs on a neural network's trial, with their default parameters."""

XGBOOST_RULES = ("loss_not_decreasing", "overtraining", "exploding_tensor")
"""Rules the report runs on an XGBoost trial: those the default collections (losses, metrics) feed; a
network's rules find no weights or gradients there."""

REPORT_SUFFIXES = (".html", ".htm")
"""What the name of a report's file may end in."""

MAX_DISTRIBUTIONS = 8  # heat maps per collection
MAX_FEATURES = 10  # lines of the feature importance plot
MAX_LABELS = 50  # line labels named in an image's text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 10px; font-size: 0.9em; }
tr:nth-child(even) { background: #f6f6f6; } img { max-width: 100%; display: block; margin: 0.5em 0; }
.fired { color: #b00020; font-weight: bold; } .ok { color: #2e7d32; } .note { color: #666; font-style: italic; }
"""


def _png(draw: Callable[[Axes], Any], figsize: tuple[float, float] = (9, 4)) -> str:
    """Draw on a new figure (no pyplot: no GUI backend) and return an ``<img>`` with a PNG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{html_text(_described(ax), message=True)}' src='data:image/png;base64,{data}'>"


def _described(ax: Axes) -> str:
    """The text of an image of ``ax``: its title and the labels of its lines (the first ``MAX_LABELS``; a label
    starting with ``_`` is matplotlib's for a line without one, a name starting so is drawn as `` _name``)."""
    named = [label for line in ax.get_lines() if not (label := str(line.get_label())).startswith("_")]
    labels = [label[1:] if label.startswith(" _") else label for label in named]
    more = f", and {len(labels) - MAX_LABELS} more" if len(labels) > MAX_LABELS else ""
    return "; ".join(filter(None, (ax.get_title(), ", ".join(labels[:MAX_LABELS]) + more))) or "plot"


def _note(text: str) -> str:
    return f"<p class='note'>{html_text(text, message=True)}</p>"


def _section(title: str, draw: Callable[[], str]) -> str:
    try:
        body = draw()
    except (TensortapError, ValueError, KeyError) as exc:
        body = _note(f"not drawn: {exc}")
    return f"<section><h2>{html_text(title)}</h2>{body}</section>"


def _scalars(trial: Trial, collection: str) -> list[str]:
    out = []
    for n in trial.tensor_names(collection=collection):
        shape = trial.tensor(n).summary()["shape"]
        if shape is not None and int(np.prod(shape)) == 1:
            out.append(n)
    return out


def _curves(trial: Trial, collection: str) -> str:
    from .plot import plot_tensors

    names = _scalars(trial, collection)
    if not names:
        return _note(f"no scalar tensor in collection {collection!r}")
    return _png(lambda ax: plot_tensors(trial, names, ax=ax))  # several modes: against the global step


def _gradient_norms(trial: Trial) -> str:
    from .plot import plot_tensors

    names = trial.tensor_names(collection="gradients")  # of one value too: a bias of a head of one output
    if not names:
        return _note("no gradients were captured (collection 'gradients')")
    return _png(lambda ax: plot_tensors(trial, names, "l2", ax=ax, logy=True), figsize=(9, 5))


def _distributions(trial: Trial, collection: str) -> str:
    single = set(_scalars(trial, collection))  # one value a step: its curve says it all
    names = [n for n in trial.tensor_names(collection=collection) if n not in single]
    if not names:
        return _note(f"no tensor in collection {collection!r}")
    parts = []
    for name in names[:MAX_DISTRIBUTIONS]:
        tensor = trial.tensor(name)

        def draw(ax: Axes, t: Tensor = tensor) -> None:
            t.plot_histograms(ax=ax)

        try:
            parts.append(_png(draw, figsize=(9, 3.2)))
        except (TensortapError, ValueError) as exc:
            parts.append(_note(f"{name}: {exc}"))
    if len(names) > MAX_DISTRIBUTIONS:
        parts.append(_note(f"... and {len(names) - MAX_DISTRIBUTIONS} more tensors in {collection!r}"))
    return "".join(parts)


def _is_xgboost(trial: Trial) -> bool:
    return frameworks(trial) == {"xgboost"}


def default_rules(trial: Trial) -> tuple[str, ...]:
    """The rules the report runs on ``trial`` when none are given: :data:`XGBOOST_RULES` for XGBoost,
    else :data:`DEFAULT_RULES`."""
    return XGBOOST_RULES if _is_xgboost(trial) else DEFAULT_RULES


def _feature_importance(trial: Trial) -> str:
    """The gain of the :data:`MAX_FEATURES` most important features over the rounds."""
    from .plot import plot_tensors

    names = trial.tensor_names(regex="^feature_importance/gain/")
    if not names:
        return _note("no gain importance was captured (collection 'feature_importance')")
    last = {n: trial.tensor(n).value(trial.tensor(n).steps()[-1]) for n in names}
    top = sorted(names, key=lambda n: -float(last[n]))[:MAX_FEATURES]
    more = _note(f"... and {len(names) - len(top)} less important features") if len(names) > len(top) else ""
    return _png(lambda ax: plot_tensors(trial, top, ax=ax), figsize=(9, 5)) + more


def _rules(trial: Trial, specs: Sequence[str], ran: list[Rule]) -> str:
    """The table of the verdicts of the rules ``specs``; the rules, once run, are appended to ``ran``."""
    from ..exceptions import RuleInputsMissing, TensortapError
    from .rules import RuleRunner, make_rule
    from .rules.runner import rule_status

    rows = []
    built = []
    for spec in specs:
        try:
            built.append((spec, make_rule(spec, trial)))
        except (ValueError, TypeError) as exc:
            rows.append((spec, "<span class='note'>not run</span>", html_text(str(exc), message=True)))
    for spec, rule in built:  # one runner per rule: one rule that cannot judge does not stop the others
        fired: list[Verdict] = []
        try:
            RuleRunner(trial, [rule]).run(wait=False, on_verdict=lambda _, verdict: fired.append(verdict))  # noqa: B023
        except RuleInputsMissing:
            pass  # its status says so
        except TensortapError as exc:  # this rule's row says so; the others are judged
            rows.append(
                (html_text(spec), "<span class='note'>could not judge</span>", html_text(str(exc), message=True))
            )
            continue
        ran.append(rule)
        status = rule_status(rule)
        lacked = "; ".join(rule.missing_inputs)
        if status == "inputs_missing":
            verdict, reason = "<span class='note'>could not judge</span>", lacked
        elif status == "no_step":
            verdict, reason = "<span class='note'>judged nothing</span>", "no step evaluated"
        else:
            if fired:
                steps = ", ".join(str(v.step) for v in fired[:10]) + (" ..." if len(fired) > 10 else "")
                verdict, reason = f"<span class='fired'>fired at {len(fired)} step(s): {steps}</span>", fired[0].reason
            else:
                verdict = "<span class='ok'>did not fire</span>"
                reason = f"evaluated {rule.evaluated_steps} step(s) up to step {rule.last_step}"
            reason += f"; it lacked some inputs: {lacked}" if lacked else ""  # and judged with the others
        rows.append((html_text(spec), verdict, html_text(reason, message=True)))
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    return f"<table><tr><th>rule</th><th>verdict</th><th>reason</th></tr>{body}</table>"


def build_report(trial: Trial, rules: Sequence[str] | None = None, show_progress: bool | None = None) -> str:
    """The report of ``trial`` as one HTML document (no external resources); ``rules``: default
    :func:`default_rules`."""
    return _report(trial, rules, show_progress)[0]


def _report(trial: Trial, rules: Sequence[str] | None, show_progress: bool | None) -> tuple[str, list[Rule]]:
    """:func:`build_report`, and the rules it ran."""
    ran: list[Rule] = []
    sections: list[tuple[str, Callable[[], str]]] = [
        ("Summary", lambda: trial_html(trial)),
        ("Losses", lambda: _curves(trial, "losses")),
        ("Metrics", lambda: _curves(trial, "metrics")),
    ]
    if _is_xgboost(trial):
        sections.append(("Feature importance (gain) over rounds", lambda: _feature_importance(trial)))
    else:
        sections += [
            ("Gradient norms per layer (L2)", lambda: _gradient_norms(trial)),
            ("Weight distributions over steps", lambda: _distributions(trial, "weights")),
            ("Gradient distributions over steps", lambda: _distributions(trial, "gradients")),
        ]
    sections.append(("Rules", lambda: _rules(trial, default_rules(trial) if rules is None else rules, ran)))
    with trial.frozen():  # one view of the trial, and on remote storage no listing per tensor
        parts = [_section(title, draw) for title, draw in progress(sections, desc="report", enable=show_progress)]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>tensortap report: {html_text(trial.path)}</title><style>{STYLE}</style></head><body>"
        f"<h1>tensortap report</h1><p>{html_text(trial.path)} &middot; generated {stamp}</p>"
        f"{''.join(parts)}</body></html>"
    )
    return page, ran


def write_report(
    trial: Trial,
    output: str | os.PathLike[str],
    rules: Sequence[str] | None = None,
    show_progress: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Rule]:
    """Write :func:`build_report` to ``output`` (UTF-8; whole or not at all: :func:`written_whole`, with
    ``storage_options`` for a URL) and return the rules it ran.

    Returns
    -------
    list of Rule
        The rules of the report, after their run: :func:`~tensortap.trial.rules.runner.rule_status` gives the
        outcome of each (its row of the page).

    Raises
    ------
    ValueError
        ``output`` does not end in one of :data:`REPORT_SUFFIXES`.
    NotADirectoryError, FileNotFoundError
        A folder of ``output`` is a file or missing. Either way before the report is built
        (:func:`~tensortap.trial.export.check_output`).
    """
    check_output(os.fspath(output), REPORT_SUFFIXES, storage_options=storage_options)
    html, ran = _report(trial, rules, show_progress)
    with written_whole(os.fspath(output), storage_options) as file:
        file.write(html.encode("utf-8"))
    return ran
