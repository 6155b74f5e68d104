"""Interleaved measurement of several arms, with a second baseline arm for the run's own noise.

Every arm keeps its own state (a model, an optimizer, a hook) for the whole
measurement and runs ``block`` units of work at a time; the arms take turns,
block after block, in a new random order every round, so that a slow spell of
the machine (another job, a page-cache flush) falls on every arm alike
instead of on whichever ran then. Two arms run the baseline: their ratio,
which would be exactly 1 on a quiet machine, is the run's noise, reported
next to every figure. This is why no "best of N" is taken: a minimum hides
contention and favours whichever arm was lucky.

Only the standard library is used here: smdebug's own environment imports
this module too.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

BASELINE = "baseline"
BASELINE_2 = "baseline (2nd arm)"


class Arm(Protocol):
    """One measured configuration: runs ``n`` units of work per call, closes at the end."""

    def run(self, n: int) -> float | None:
        """Do ``n`` units of work (training steps, boosting rounds, writes).

        Returns None to be timed by :func:`interleave`, or the seconds the work
        took as the arm measured them itself (work done in another process,
        whose start is not to be counted).
        """

    def close(self) -> None:
        """Finish (a hook publishes its last shard here); timed as part of the arm."""


def settle(arm: Arm) -> float:
    """Wait for the work ``arm`` left to background threads, if it has a ``settle()`` method; return
    the seconds that took (0 without one).

    An arm whose hook publishes shards on the writer thread defines ``settle()`` (publishing
    the shard it is building and waiting until its shards are published); :func:`interleave`
    calls it at the end of each of the arm's blocks, timed with the block, so that the next
    arm's block does not pay for this arm's writing (in the real training there is no next
    arm), nor the writer thread publish this arm's shard by time while another arm runs.
    Its time is also kept apart (:attr:`Timing.settles`): a long training overlaps that wait
    with its next steps, so the figure with it is an upper bound and without it a lower one.
    Work the block itself must finish (steps dispatched asynchronously) belongs in ``run``.
    """
    wait: Callable[[], None] | None = getattr(arm, "settle", None)
    if wait is None:
        return 0.0
    t0 = time.perf_counter()
    wait()
    return time.perf_counter() - t0


def discard(arm: Arm) -> None:
    """Remove what ``arm`` wrote (its trial), if it has a ``discard()`` method.

    :func:`interleave` calls it after every arm's ``close()`` was timed, untimed: a training
    does not delete its trial. (Until the fourteenth session the arms deleted their trial in
    ``close()``: 0.9-1.0 s for the 250 steps of the torch every-step arm, 1 GB of shards, most
    of its closing time.)
    """
    remove: Callable[[], None] | None = getattr(arm, "discard", None)
    if remove is not None:
        remove()


class GatedThread:
    """An :class:`Arm` for trainings that run to their end on their own (``fit``, ``xgb.train``).

    The training runs in a thread of its own and calls :meth:`gate` at the
    start of every step (from a callback of the framework); :meth:`run` lets
    ``n`` more steps through and returns when the training waits at its gate
    again, so every arm runs exactly as its framework runs it, one arm at a
    time. :meth:`close` lets the training finish and times its end (where a
    hook publishes its last shard).
    """

    def __init__(self, train: Callable[[], object]) -> None:
        self.allowed = 0  # steps the training may still start
        self.waiting = False  # the training waits at its gate
        self.ended = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._train, args=(train,), daemon=True)
        self.thread.start()

    def _train(self, train: Callable[[], object]) -> None:
        try:
            train()
        except BaseException as exc:  # reported by run and close
            self.error = exc
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def gate(self) -> None:
        """Called by the training before each step: wait until it may start."""
        with self.cond:
            self.waiting = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.allowed > 0)
            self.waiting = False
            self.allowed -= 1

    def run(self, n: int) -> None:
        """Let ``n`` steps through and wait for them."""
        with self.cond:
            self.cond.wait_for(lambda: self.waiting or self.ended)
            if self.ended:
                raise RuntimeError(f"the training ended early: {self.error!r}")
            self.allowed = n
            self.cond.notify_all()
            self.cond.wait_for(lambda: (self.waiting and self.allowed == 0) or self.ended)
        if self.error is not None:
            raise RuntimeError(f"the training failed: {self.error!r}") from self.error

    def close(self) -> None:
        """Let the training run to its end."""
        with self.cond:
            self.allowed = 1 << 60
            self.cond.notify_all()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"the training failed: {self.error!r}") from self.error


class Repeat:
    """An :class:`Arm` that calls ``fn`` once per unit of work (a query, a read); nothing to close."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn

    def run(self, n: int) -> None:
        """Call ``fn`` ``n`` times."""
        for _ in range(n):
            self.fn()

    def close(self) -> None:
        """Nothing to finish."""


class Process:
    """An :class:`Arm` that runs ``argv + [n]`` in a process of its own for every block.

    The process does ``n`` units of work and prints, as the last line of its
    output, the seconds they took as it measured them, so that starting it
    (the interpreter, its imports) is not counted. This is how work that runs
    in another environment (smdebug's) is interleaved with ours.
    """

    def __init__(self, argv: Sequence[str], cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.cwd = cwd

    def run(self, n: int) -> float:
        """Run one process for ``n`` units; the seconds it reported."""
        done = subprocess.run([*self.argv, str(n)], cwd=self.cwd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(self.argv)} failed:\n{done.stderr[-2000:]}")
        return float(done.stdout.split()[-1])

    def close(self) -> None:
        """Nothing to finish."""


class Remote:
    """An :class:`Arm` that lives in a process of its own for the whole measurement.

    ``argv`` starts a process (another environment: smdebug's) that builds one arm and
    calls :func:`serve` with it; the arm keeps its state between blocks, as arms in this
    process do, and is interleaved with them. Building it (the interpreter, its imports,
    the model) is not timed; each block reports the seconds the child measured.
    """

    def __init__(self, argv: Sequence[str], cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.log = tempfile.TemporaryFile(mode="w+")  # the child's stderr, shown if it fails
        self.settled = 0.0  # seconds the child's arm settled at the end of the last block
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self._reply()  # "ready": the arm is built

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"{' '.join(self.argv)} failed:\n{self.log.read()[-2000:]}")
        return line.strip()

    def _ask(self, command: str) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return [float(x) for x in self._reply().split()]

    def run(self, n: int) -> float:
        """Run ``n`` units (and settle) in the child; the seconds it measured, of which :attr:`settled` settling."""
        seconds, self.settled = self._ask(f"run {n}")
        return seconds

    def close(self) -> None:
        """Close the child's arm (timed by the child)."""
        self._ask("close")

    def discard(self) -> None:
        """Have the child remove what its arm wrote, and wait for it to exit (see :func:`discard`)."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a child that failed has exited already
            self.proc.stdin.write("discard\n")
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def serve(make: Callable[[], Arm]) -> None:
    """The child's side of :class:`Remote`: build an arm with ``make``, run blocks of it as the
    parent asks, close it, and at "discard" remove what it wrote (untimed) and return.

    Replies go to the process's original standard output; anything else written there
    (a library's logging) is sent to standard error instead.
    """
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    arm = make()
    print("ready", file=replies, flush=True)
    with collected():
        for line in sys.stdin:
            command, *args = line.split()
            if command == "discard":
                discard(arm)
                return
            t0 = time.perf_counter()
            if command == "run":
                arm.run(int(args[0]))
                waited = settle(arm)
                print(time.perf_counter() - t0, waited, file=replies, flush=True)  # the block, and its settle
            else:
                arm.close()
                print(time.perf_counter() - t0, file=replies, flush=True)


@dataclass
class Timing:
    """What one arm took: per-block seconds (its settle included) and the closing time."""

    blocks: list[float] = field(default_factory=list)
    closing: float = 0.0
    units: int = 0
    settles: list[float] = field(default_factory=list)  # of each block, the seconds its settle took

    @property
    def unsettled(self) -> float:
        """Seconds of every block, its settle left out, plus closing (see :func:`settle`)."""
        return self.total - sum(self.settles)

    @property
    def total(self) -> float:
        """Seconds of every block plus closing."""
        return sum(self.blocks) + self.closing

    @property
    def per_unit(self) -> float:
        """Seconds per unit of work, closing included."""
        return self.total / max(self.units, 1)


def interleave(arms: Mapping[str, Callable[[], Arm]], *, rounds: int, block: int, warmup: int = 0) -> dict[str, Timing]:
    """Build every arm, run ``rounds`` blocks of ``block`` units each, interleaved, and close them (the
    last built first).

    Parameters
    ----------
    arms
        Arm name to a factory (construction is not timed).
    rounds
        How many blocks each arm runs.
    block
        Units of work per block.
    warmup
        Untimed units each arm runs first, then settles (tracing, first-touch memory: a hook's
        first shards take fresh memory until its pool of shard arrays is full, see ``bench/notes.md``).
    """
    rng = random.Random(0)  # the same orders in every run
    built = {name: make() for name, make in arms.items()}
    for arm in built.values():
        if warmup:
            arm.run(warmup)
            settle(arm)  # what the warm-up handed off is not billed to the first block
    timings = {name: Timing() for name in built}
    names = list(built)
    with collected():
        for _ in range(rounds):
            # a new order each round: a rotation would keep each arm behind the same one, whose
            # leftovers (a shard published by time, pages to reclaim) it would always pay for
            for name in rng.sample(names, len(names)):
                arm = built[name]
                t0 = time.perf_counter()
                own = arm.run(block)
                waited = settle(arm)
                if own is None:
                    timings[name].blocks.append(time.perf_counter() - t0)
                    timings[name].settles.append(waited)
                else:  # timed by the arm itself (another process), which says how long it settled
                    timings[name].blocks.append(own)
                    timings[name].settles.append(getattr(arm, "settled", 0.0))
                timings[name].units += block
    try:
        # the last built first: a process-wide cost paid by whichever closes last (the last capture to close
        # frees the pool of shard arrays that every capture filled: 25-30 ms after an every-step arm) falls
        # on the first arm built (in the torch table the one saving every step, which filled most of it), not on a
        # small arm built after it (the torch table's step-0-only arm read 27 ms to close against 3 alone)
        for name, arm in reversed(built.items()):
            t0 = time.perf_counter()
            arm.close()
            timings[name].closing = time.perf_counter() - t0
    finally:
        for arm in built.values():
            discard(arm)
    return timings


@contextlib.contextmanager
def collected() -> Iterator[None]:
    """Measure in a process whose garbage is collected and whose objects are frozen (``gc.freeze``).

    Otherwise the first full collection after the imports and set-up (0.2-0.3 s with torch
    loaded, on this kind of machine) lands in the block of whichever arm happens to cross
    the collector's threshold, and bills that arm for it (``bench/notes.md``).
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def noise(timings: Mapping[str, Timing]) -> float:
    """|second baseline / baseline - 1|: how far two identical arms disagree in this run."""
    return abs(timings[BASELINE_2].total / timings[BASELINE].total - 1.0)


def spread(t: Timing) -> float:
    """Relative spread of one arm's blocks: (upper - lower quartile) / median."""
    if len(t.blocks) < 4:
        return 0.0
    q = statistics.quantiles(t.blocks, n=4)
    return (q[2] - q[0]) / q[1]


def interval_column(column: str) -> str:
    """The column that holds the 95% interval (a pair, low and high) of the figure in ``column``."""
    return f"{column}, 95% interval"


#: The column of :func:`rows` that holds the 95% interval of ``ratio``.
INTERVAL = interval_column("ratio")
#: The column of :func:`rows` that holds the ratio with each block's settle left out (a lower bound).
UNSETTLED = "ratio, settle left out"
_DRAWS = 4000  # resamplings of the rounds behind an interval


def interval(t: Timing, base: Timing, level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` interval of ``t.total / base.total`` over the rounds: a paired bootstrap.

    Each round ran every arm once, so a round's blocks are resampled together (with replacement,
    seeded: the same draws in every run) and the closing times kept; the interval is the central
    ``level`` of the ratios of the resampled totals. It shows how far the ratio moves with the
    blocks the machine happened to give each arm, which one pair of baseline arms (``noise``) can
    understate. None with fewer than 4 rounds.
    """
    n = min(len(t.blocks), len(base.blocks))
    if n < 4:
        return None
    picks = np.random.default_rng(0).integers(0, n, size=(_DRAWS, n))
    ratios = (np.asarray(t.blocks[:n])[picks].sum(axis=1) + t.closing) / (
        np.asarray(base.blocks[:n])[picks].sum(axis=1) + base.closing
    )
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def rows(
    benchmark: str,
    timings: Mapping[str, Timing],
    unit: str = "ms_per_step",
    scale: float = 1e3,
    unsettled: bool = True,
) -> list[dict[str, object]]:
    """One row per arm: time per unit (seconds times ``scale``, in the column ``unit``), ratio to the
    baseline arm, its 95% interval (:func:`interval`) and the run's noise; and, apart, the ratio with
    each block's settle left out (:data:`UNSETTLED`: the wait for the arm's last shard of the block,
    which a long training overlaps with its next steps, so a lower bound where ``ratio`` is an
    upper one), the ratio of the blocks alone and the time ``close()`` took (ms): a short run pays
    its last publish in full (``bench/notes.md``). ``unsettled=False`` leaves that column out, for
    tables whose work is the writing that the arms' settle finishes (the write tables)."""
    base = timings[BASELINE]
    n = noise(timings)
    out: list[dict[str, object]] = []
    for name, t in timings.items():
        row: dict[str, object] = {
            "benchmark": benchmark,
            "case": name,
            unit: t.per_unit * scale,
            "ratio": t.total / base.total,
            INTERVAL: interval(t, base) if name != BASELINE else None,
            "noise": n,
        }
        if unsettled:
            row[UNSETTLED] = t.unsettled / base.unsettled
        row.update(
            {
                "block spread": spread(t),
                "ratio of the blocks": sum(t.blocks) / sum(base.blocks),
                "closing (ms)": t.closing * 1e3,
            }
        )
        out.append(row)
    return out
