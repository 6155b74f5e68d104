"""``tensortap import-smdebug SMDEBUG_TRIAL OUT_DIR``: turn an smdebug trial into a tensortap trial."""

from __future__ import annotations

import argparse
from typing import Any

from .cli import add_json_argument, print_json, printable, storage_options
from .importers.smdebug import import_smdebug


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``import-smdebug`` subcommand to ``subparsers`` (the ``tensortap`` command's)."""
    p = subparsers.add_parser(
        "import-smdebug",
        help="write an smdebug (SageMaker Debugger) trial as a tensortap trial",
        description=(
            "Read the event, index and collection files smdebug wrote and write the same tensors as a "
            "tensortap trial (names mapped as docs/migrating-from-smdebug.md says; each step's mode from its "
            "index file, as smdebug reads it; what is not imported, such as shapes saved without values, is "
            "listed as skipped). "
            "Exit status: 0 imported, 2 no smdebug trial, a malformed file (or two of one step of a worker), "
            "or OUT_DIR not empty, a file or not writable; an import that fails removes what it wrote to OUT_DIR "
            "(and the empty folders it made above it)."
        ),
    )
    p.add_argument("smdebug_trial", metavar="SMDEBUG_TRIAL", help="smdebug trial directory or URL (s3://...)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new tensortap trial directory or URL (must be empty)")
    for flag, what in (("--storage-options", "SMDEBUG_TRIAL"), ("--out-storage-options", "OUT_DIR")):
        p.add_argument(flag, type=storage_options, default={}, metavar="JSON", help=f"fsspec options for {what}")
    add_json_argument(p, "docs/migrating-from-smdebug.md")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Import; print what was written (errors are reported by the ``tensortap`` command, exit 2)."""
    summary = import_smdebug(
        args.smdebug_trial,
        args.out_dir,
        storage_options=args.storage_options,
        out_storage_options=args.out_storage_options,
    )
    if args.json:
        print_json({"out_dir": args.out_dir, **vars(summary)})
        return 0
    print(
        printable(
            f"imported {summary.steps} steps, {len(summary.tensors)} tensors, "
            f"workers {', '.join(summary.workers)} into {args.out_dir}",
            message=True,
        )
    )
    for name, why in sorted(summary.skipped.items()):
        print(printable(f"  skipped {name}: {why}", message=True))
    return 0


PARSERS = [add_parser]
