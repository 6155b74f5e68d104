"""The viewing commands of ``tensortap``: ``export``, ``plot`` and ``report``.

::

    tensortap export PATH [-o out.csv|out.parquet] [--reduction mean ...] [--collection C]
    tensortap export tensorboard PATH LOGDIR [--reduction mean ...] [--collection C]
    tensortap plot RUN [RUN ...] [NAME ...] [--regex R] [--reduction R] [--mode M] [--x step] [-o plot.png]
    tensortap report PATH [-o report.html]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .exceptions import UsageError
from .modes import Mode

X_CHOICES = ("step", "global_step", "time")


def _check_output(
    path: str, suffixes: Sequence[str], *, stdout: bool = False, storage_options: dict[str, Any] | None = None
) -> str:
    """``-o``, checked before any work (:func:`~tensortap.trial.export.check_output`, a URL's storage reached with
    ``storage_options``; the function that writes it does not ask the storage again): a suffix not among
    ``suffixes`` is a usage error (exit 2)."""
    from .trial.export import check_output

    try:
        return check_output(path, suffixes, stdout=stdout, storage_options=storage_options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _output_options(args: argparse.Namespace, path: str, output: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``--storage-options`` for the trial at ``path`` (None: all of them, refused by a local trial) and for the
    output file or folder ``output``: where that is a URL (``s3://``), each of the two that is a URL gets them."""
    from .backends.registry import is_local_path

    if output == "-" or is_local_path(output):
        return None, {}
    return _run_options(path, args.storage_options), args.storage_options


def _trial(args: argparse.Namespace, path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The trial at ``path``, opened with ``storage_options`` (default: ``--storage-options``)."""
    from .cli import open_trial

    options = args.storage_options if storage_options is None else storage_options
    return open_trial(argparse.Namespace(**{**vars(args), "path": path, "storage_options": options}))


def _wrote(args: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    """Report what a command wrote: ``result`` as JSON with ``--json``, else ``text``; exit 0."""
    from .cli import print_json, printable

    if args.json:
        print_json(result)
    else:
        print(printable(text, message=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export reductions of every tensor to CSV/Parquet (or JSON), or the trial to TensorBoard event files."""
    from .cli import print_json, printable
    from .trial.export import TABLE_SUFFIXES, export_table, export_tensorboard

    targets = list(args.path)
    if targets[0] == "tensorboard" and len(targets) == 3:
        path, logdir = targets[1:]
        if args.output is not None:
            raise UsageError(
                f"-o/--output is for tables (CSV, Parquet); `export tensorboard` writes into LOGDIR ({logdir})"
            )
        trial_options, out_options = _output_options(args, path, logdir)
        trial = _trial(args, path, trial_options)
        counts = export_tensorboard(
            trial, logdir, reductions=args.reduction or None, collection=args.collection, storage_options=out_options
        )
        text = f"wrote {counts['scalars']} scalars and {counts['histograms']} histograms to {logdir}"
        return _wrote(args, {"path": path, "logdir": logdir, **counts}, text)
    if len(targets) != 1:
        raise UsageError("expected PATH, or `tensorboard PATH LOGDIR`")
    args.output = "-" if args.output is None else args.output
    trial_options, out_options = _output_options(args, targets[0], args.output)
    args.output = _check_output(args.output, TABLE_SUFFIXES, stdout=True, storage_options=out_options)
    trial = _trial(args, targets[0], trial_options)
    reductions = args.reduction or None
    if args.output == "-" and args.json:
        df = trial.to_pandas(collection=args.collection, reductions=reductions, exact_ints=True)
        print_json({"path": targets[0], "row_count": len(df), "rows": df.to_dict(orient="records")})
        return 0
    escape = printable if args.output == "-" and sys.stdout.isatty() else None
    rows = export_table(
        trial,
        args.output,
        reductions=reductions,
        collection=args.collection,
        escape=escape,
        storage_options=out_options,
    )
    if args.output == "-":
        return 0
    return _wrote(
        args, {"path": targets[0], "output": args.output, "row_count": rows}, f"wrote {rows} rows to {args.output}"
    )


def _run_options(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """``--storage-options`` as they apply to the run at ``path`` among the runs of ``plot``: to a URL's; a local
    path takes none (a local run compared with an S3 one)."""
    from .backends.registry import is_local_path

    return {} if is_local_path(path) else options


def _is_trial(path: str, options: dict[str, Any]) -> bool:
    """Whether ``path`` (an argument of ``plot`` after its first run) holds a trial: another run; else it is a
    tensor name. An error telling it (a storage that fails, a folder that cannot be read) is raised: an existing
    trial is never taken for a name."""
    from .trial.trial import is_trial, trial_storage

    return is_trial(trial_storage(path, **_run_options(path, options)))


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot tensors (scalars, or a reduction) of one or more runs across steps into an image file."""
    from matplotlib.figure import Figure

    from .backends.registry import is_local_path
    from .trial.compare import Comparison
    from .trial.plot import IMAGE_SUFFIXES, curves_axis, plot_tensors, save_plot

    out_options = _run_options(args.output, args.storage_options)
    args.output = _check_output(args.output, IMAGE_SUFFIXES, storage_options=out_options)
    runs = [args.path]
    names: list[str] = []
    for item in args.items:  # runs first; an item that is not a trial is a tensor name
        (runs if not names and _is_trial(item, args.storage_options) else names).append(item)
    # --storage-options are for the URLs among the runs and -o; where there is none, every run refuses them (exit 2)
    remote = not all(map(is_local_path, [*runs, args.output]))
    comparison = Comparison([_trial(args, r, _run_options(r, args.storage_options) if remote else None) for r in runs])
    names += [n for n in comparison.tensor_names(regex=args.regex) if n not in names] if args.regex else []
    if not names:
        raise UsageError("give tensor names or a --regex that matches some")
    ax = Figure(figsize=(8, 4.5)).subplots()
    mode = Mode.parse(args.mode) if args.mode else None
    x = args.x or curves_axis(comparison.trials, names, mode)
    plot_tensors(comparison.trials, names, args.reduction, mode, ax=ax, logy=args.logy, x=x, labels=comparison.labels)
    save_plot(ax, args.output, out_options)
    text = f"wrote {args.output} ({len(names)} tensor(s), {len(runs)} run(s), against the {x.replace('_', ' ')})"
    return _wrote(args, {"runs": runs, "tensors": names, "output": args.output, "x": x}, text)


def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of a trial; exit 2, as ``rules``, when a rule given with ``--rule``
    judged nothing, or no rule of the default set judged a step."""
    from .cli import error_json, usage_after_output
    from .cli_rules import build_rules, run_problem
    from .trial.report import REPORT_SUFFIXES, default_rules, write_report

    trial_options, out_options = _output_options(args, args.path, args.output)
    # a wrong suffix, a folder that is a file or missing, a URL's storage that cannot be reached: exit 2
    args.output = _check_output(args.output, REPORT_SUFFIXES, storage_options=out_options)
    trial = _trial(args, args.path, trial_options)
    rules = args.rule or list(default_rules(trial))
    build_rules(rules, trial)  # an unknown rule or parameter: exit 2 (as `rules`) before anything is written
    ran = write_report(trial, args.output, rules=rules, storage_options=out_options)
    problem = run_problem(trial, ran) if ran else None  # none ran: the page says why its rules were not drawn
    if problem is not None and not args.rule and any(r.evaluated_steps for r in ran):
        problem = None  # of the default set, the rules that could judge did: the page says which could not
    result: dict[str, Any] = {"path": args.path, "output": args.output, "rules": rules}
    if problem is not None and args.json:  # the result, and the error every --json command gives then
        result.update(error_json("report", problem, "input"))
    _wrote(args, result, f"wrote {args.output}")
    return 0 if problem is None else usage_after_output("report", problem)


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``tensortap export``."""
    from .cli import add_json_argument, add_trial_arguments

    p = subparsers.add_parser(
        "export",
        help="write reductions of every tensor as CSV/Parquet, or export to TensorBoard",
        description="tensortap export PATH [-o out.csv|out.parquet]  |  tensortap export tensorboard PATH LOGDIR",
    )
    add_trial_arguments(p, path_nargs="+")
    p.add_argument("--collection", help="only the tensors of this collection (both forms)")
    p.add_argument(
        "--reduction",
        action="append",
        default=[],
        metavar="KEY",
        help="export this reduction of every tensor, saved or computed from raw (repeatable: mean, abs_max, l2, ...)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="file.csv or file.parquet (default: CSV on standard output); not with `export tensorboard`, "
        "which writes into LOGDIR",
    )
    add_json_argument(p)
    p.set_defaults(func=cmd_export)
    return p


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``tensortap plot``."""
    from .cli import add_json_argument, add_mode_argument, add_trial_arguments

    p = subparsers.add_parser("plot", help="plot tensors of one or more runs across steps into an image")
    add_trial_arguments(p)
    p.add_argument("items", nargs="*", metavar="RUN_OR_NAME", help="more runs (trial paths), then tensor names")
    p.add_argument("--regex", help="also every tensor whose name matches")
    p.add_argument("--reduction", help="reduction to plot (mean, abs_max, l2, ...); default: scalar values, else mean")
    add_mode_argument(p, "only steps of this mode")
    p.add_argument(
        "--x",
        choices=X_CHOICES,
        help="x axis: mode step, global step or seconds (default: the global step where the lines hold "
        "several modes, else the mode step)",
    )
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("-o", "--output", default="tensortap-plot.png", help="image file (.png, .svg, .pdf)")
    add_json_argument(p)
    p.set_defaults(func=cmd_plot)
    return p


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``tensortap report``."""
    from .cli import add_json_argument, add_trial_arguments

    p = subparsers.add_parser("report", help="write a self-contained HTML report of a trial")
    add_trial_arguments(p)
    p.add_argument("-o", "--output", default="report.html", help="HTML file, .html or .htm (default: report.html)")
    p.add_argument(
        "--rule", action="append", default=[], metavar="NAME[:PARAM=VALUE,...]", help="rules to run (default: a set)"
    )
    add_json_argument(p)
    p.set_defaults(func=cmd_report)
    return p


PARSERS = [add_export_parser, add_plot_parser, add_report_parser]
