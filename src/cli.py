"""The ``tensortap`` command: ls, show, check, export, plot, rules.

Exit status: 0 on success, 1 when ``check`` finds problems (or ``rules``
fires), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backends import layout
from .backends.registry import get_storage
from .backends.shard import INDEX_MAGIC, ShardError, ShardReader
from .exceptions import TensortapError, TrialNotFound
from .modes import Mode
from .trial import Trial, create_trial


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _steps_summary(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps: {steps[0]}, {steps[1]}, ... {steps[-1]}"


def storage_options(text: str) -> dict[str, Any]:
    """Parse ``--storage-options``: a JSON object (never eval'd)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_trial_arguments(parser: argparse.ArgumentParser, path_nargs: str | None = None) -> None:
    """The trial's path and, for object storage, its fsspec options (every subcommand takes them)."""
    parser.add_argument("path", nargs=path_nargs, help="trial directory or URL (s3://bucket/prefix, ...)")
    parser.add_argument(
        "--storage-options",
        type=storage_options,
        default={},
        metavar="JSON",
        help='fsspec options for URLs, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    )


def _open(args: argparse.Namespace) -> Trial:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trial = create_trial(args.path, storage_options=args.storage_options)
        trial.tensor_names()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return trial


def cmd_ls(args: argparse.Namespace) -> int:
    """Print workers, modes, steps and tensors of a trial."""
    trial = _open(args)
    names = trial.tensor_names(collection=args.collection, regex=args.regex)
    if args.json:
        print(
            json.dumps(
                {
                    "path": trial.path,
                    "workers": trial.workers(),
                    "training_ended": trial.training_ended,
                    "modes": {m.name: trial.steps(mode=m) for m in trial.modes()},
                    "steps": trial.steps(show_incomplete=True),
                    "tensors": {n: trial.tensor(n).summary() for n in names},
                },
                indent=2,
            )
        )
        return 0
    ended = "ended" if trial.training_ended else "running (or crashed)"
    print(f"trial    {trial.path}")
    print(f"workers  {', '.join(trial.workers()) or 'none'}  [{ended}]")
    for m in trial.modes():
        print(f"{m.name.lower():8} {_steps_summary(trial.steps(mode=m))}")
    complete = trial.steps()
    incomplete = len(trial.steps(show_incomplete=True)) - len(complete)
    print(f"steps    {_steps_summary(complete)}" + (f" (+{incomplete} incomplete)" if incomplete else ""))
    rows = []
    for n in names:
        info = trial.tensor(n).summary()
        shape = info["shape"]
        shape_text = "-" if shape is None else "x".join(map(str, shape)) or "()"
        dtype = info["dtype"] or "reductions only"
        if info["orig_dtype"]:
            dtype += f" (from {info['orig_dtype']})"
        rows.append((n, ",".join(info["collections"]), dtype, shape_text, info["steps"]))
    print()
    print(_table(rows, ("tensor", "collections", "dtype", "shape", "steps")) if rows else "no tensors")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print one tensor's value or reduction at one step or every step."""
    trial = _open(args)
    tensor = trial.tensor(args.name)
    mode = Mode.parse(args.mode) if args.mode else None
    steps = [args.step] if args.step is not None else tensor.steps(mode)
    np.set_printoptions(threshold=args.max_elements, linewidth=120)
    out: dict[str, Any] = {}
    for s in steps:
        if args.reduction:
            name, absolute = (
                (args.reduction[4:], True) if args.reduction.startswith("abs_") else (args.reduction, False)
            )
            value: Any = tensor.reduction_value(s, name, abs=absolute, mode=mode, worker=args.worker)
        else:
            value = tensor.value(s, mode=mode, worker=args.worker)
        if args.json:
            out[str(s)] = value.tolist() if isinstance(value, np.ndarray) else value
        else:
            label = f"step {s}" + (f" ({mode.name.lower()})" if mode else "")
            text = repr(value) if not isinstance(value, np.ndarray) else np.array2string(value)
            if isinstance(value, np.ndarray):
                label += f" {value.dtype} {tuple(value.shape)}"
            print(f"{label}: {text}" if "\n" not in text else f"{label}:\n{text}")
    if args.json:
        print(json.dumps(out, allow_nan=True))
    return 0


def find_problems(path: str, options: dict[str, Any] | None = None) -> list[str]:
    """Every problem in the trial at ``path``: unreadable shards, index records and markers.

    Every ``.h5`` file under the trial is opened and read in full, whether or
    not an index record names it; every index record must name a readable shard.
    """
    storage = get_storage(path, **(options or {}))
    if not storage.exists():
        raise TrialNotFound(f"no trial at {path!r}")
    problems = []
    keys = storage.walk()
    present = set(keys)
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # a temp file of a writer at work (or killed): never read
        if key.endswith(".h5"):
            try:
                reader = ShardReader(storage.local_path(key))
                try:
                    reader.validate()
                finally:
                    reader.close()
            except (ShardError, OSError) as exc:
                problems.append(f"{key}: unreadable shard ({exc})")
        elif key.endswith(".json"):
            try:
                record = storage.read_json(key)
            except (OSError, ValueError) as exc:
                problems.append(f"{key}: unreadable JSON ({exc})")
                continue
            if key.startswith(f"{layout.INDEX}/"):
                if not isinstance(record, dict) or record.get("format") != INDEX_MAGIC:
                    problems.append(f"{key}: not a tensortap index record")
                elif record.get("shard") not in present:
                    problems.append(f"{key}: names shard {record.get('shard')!r}, which does not exist")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    """Report unreadable files; exit 1 when there are any."""
    problems = find_problems(args.path, args.storage_options)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.path}", file=sys.stderr)
        return 1
    print(f"ok: no problems in {args.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the trial's scalars and reductions as CSV (long format)."""
    trial = _open(args)
    df = trial.to_pandas(collection=args.collection)
    if args.output == "-":
        df.to_csv(sys.stdout, index=False)
    else:
        df.to_csv(args.output, index=False)
        print(f"wrote {len(df)} rows to {args.output}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot tensors (scalars, or a reduction) across steps into an image file."""
    import matplotlib

    matplotlib.use("Agg")
    from .trial.plot import plot_tensors, save_plot

    trial = _open(args)
    names = list(args.names)
    if args.regex:
        names += [n for n in trial.tensor_names(regex=args.regex) if n not in names]
    if not names:
        print("tensortap plot: give tensor names or a --regex that matches some", file=sys.stderr)
        return 2
    ax = plot_tensors(trial, names, args.reduction, Mode.parse(args.mode) if args.mode else None, logy=args.logy)
    save_plot(ax, args.output)
    print(f"wrote {args.output} ({len(names)} tensor(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensortap`` command."""
    parser = argparse.ArgumentParser(prog="tensortap", description="Inspect and judge tensortap trials.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list workers, modes, steps and tensors of a trial")
    add_trial_arguments(p)
    p.add_argument("--collection", help="only tensors of this collection")
    p.add_argument("--regex", help="only tensors whose name matches")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="print a tensor's values or reductions")
    add_trial_arguments(p)
    p.add_argument("name", help="tensor name (see `tensortap ls`)")
    p.add_argument("--step", type=int, help="only this step (default: every step)")
    p.add_argument("--mode", choices=[m.name.lower() for m in Mode], help="interpret --step as a step of this mode")
    p.add_argument("--reduction", help="print a reduction instead of the value, e.g. mean, abs_max, l2, nan_count")
    p.add_argument("--worker", help="worker to read (default: the first)")
    p.add_argument("--max-elements", type=int, default=100, help="summarise arrays larger than this")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("check", help="find unreadable shards and records; exit 1 if any")
    add_trial_arguments(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="write scalars and reductions as CSV")
    add_trial_arguments(p)
    p.add_argument("--collection", help="only this collection")
    p.add_argument("-o", "--output", default="-", help="CSV file (default: standard output)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="plot tensors across steps into an image (needs matplotlib)")
    add_trial_arguments(p)
    p.add_argument("names", nargs="*", help="tensor names")
    p.add_argument("--regex", help="also every tensor whose name matches")
    p.add_argument("--reduction", help="reduction to plot (mean, abs_max, l2, ...); default: scalar values, else mean")
    p.add_argument("--mode", choices=[m.name.lower() for m in Mode], help="only steps of this mode")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("-o", "--output", default="tensortap-plot.png", help="image file (.png, .svg, .pdf)")
    p.set_defaults(func=cmd_plot)

    try:
        from .cli_rules import add_parser as add_rules_parser
    except ImportError:  # the rules command is optional until it lands
        pass
    else:
        add_rules_parser(sub)
    from .cli_smdebug import add_parser as add_smdebug_parser

    add_smdebug_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (TensortapError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        print(f"tensortap {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
