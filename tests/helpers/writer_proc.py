"""A writer process the tests drive line by line over stdin.

Usage: ``python writer_proc.py OUT_DIR [--rank R] [--interval N] [--max-steps N] [--max-seconds S]
[--if-exists E] [--run-id RUN [--first-step N]] [--own-sigterm-handler] [--default-sigint] [--torch]
[--signal-at SIG:STEP] [--signal-in-pool SIG]``, or ``python writer_proc.py --fork-server`` (see :func:`fork_server`).

Each stdin line is a JSON command; the process answers ``ok <op>`` on stdout
once the command is done (``ready`` once the writer exists):

- ``{"op": "steps", "n": 3, "names": ["a"], "mode": "TRAIN", "delay": 0, "catch": false}``: run ``n``
  steps, saving every name with :func:`value_for`, after sleeping ``delay`` seconds. With
  ``catch``, a ``KeyboardInterrupt`` is caught and training goes on, as in a notebook; the
  process prints ``catching`` before the first step.
  With ``--torch``, each step is a training step of :func:`torch_model` (``names`` unused).
- ``{"op": "flush"}``: publish everything saved so far and wait for it.
- ``{"op": "spin"}``: save steps forever (publishing all the time) until killed.
- ``{"op": "close"}``: close the writer (end marker ``closed``) and keep running.
- ``{"op": "exit"}``: return from the script without closing (interpreter exit closes).

``--run-id RUN`` continues the run ``RUN`` of an earlier writer process (a training resumed), its
steps numbered on from ``--first-step``. ``--signal-at SIG:STEP`` sends the process ``SIG`` while
the hook records step ``STEP`` (from a step listener, called inside ``end_step``).
``--signal-in-pool SIG`` sends it while the main thread holds the lock of the shard buffer pool.
``--default-sigint`` puts Python's default SIGINT handler back after the writer exists, as Jupyter
kernels do around every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from types import FrameType
from typing import Any

import numpy as np

from tensortap import SaveConfig
from tensortap.backends.shard import POOL, BufferPool
from tensortap.capture import ShardPolicy, Writer
from tensortap.capture.core import Hook


def value_for(name: str, step: int, rank: int) -> np.ndarray:
    """The value the writer of ``rank`` saves under ``name`` at global ``step``."""
    return np.arange(4, dtype=np.float32) + step + 1000 * rank + 0.5 * len(name)


def torch_model() -> tuple[Any, Any, Any, Any]:
    """The tiny, deterministic training of ``--torch``: ``(model, optimizer, x, y)``."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    y = torch.linspace(0, 1, 8).reshape(4, 2)
    return model, opt, x, y


def torch_step(model: Any, opt: Any, x: Any, y: Any) -> None:
    """One training step of :func:`torch_model`."""
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()


def _step(w: Hook, cmd: dict, rank: int, training: tuple[Any, ...] | None) -> None:
    if training is not None:
        torch_step(*training)
        return
    with w.stepping(mode=cmd.get("mode")):
        for name in cmd["names"]:
            w.save(name, value_for(name, w.step, rank))


def _steps(w: Hook, cmd: dict, rank: int, training: tuple[Any, ...] | None) -> None:
    time.sleep(cmd.get("delay", 0))
    if not cmd.get("catch"):
        for _ in range(cmd["n"]):
            _step(w, cmd, rank, training)
        return
    left, announce = cmd["n"], True
    # A KeyboardInterrupt may land in the harness's own except clause or loop (Python checks for
    # signals there too): the outer level catches that one and the inner loop goes on.
    while left:
        try:
            if announce:
                announce = False
                print("catching", flush=True)  # the test interrupts only from here on
            while left:
                try:
                    left -= 1
                    _step(w, cmd, rank, training)
                except KeyboardInterrupt:
                    pass
        except KeyboardInterrupt:
            pass


def _own_sigterm_handler(signum: int, frame: object) -> None:
    print("own handler", flush=True)
    sys.exit(3)


def _signal_at(w: Hook, signum: int, step: int) -> None:
    def listener(record: Any) -> None:
        if record.step == step:
            signal.raise_signal(signum)
            print(f"signalled {step}", flush=True)

    w.step_listeners.append(listener)


def _signal_in_pool(signum: int) -> None:
    """Send ``signum`` once, the first time the main thread runs ``BufferPool.get`` holding its lock."""
    code = BufferPool.get.__code__

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and POOL._lock.locked():
            sys.settrace(None)
            frame.f_trace = None
            signal.raise_signal(signum)
            return None
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code is code else None

    sys.settrace(tracer)


def _make_writer(args: argparse.Namespace) -> tuple[Hook, tuple[Any, ...] | None]:
    common: dict[str, Any] = {
        "rank": args.rank,
        "save_config": SaveConfig(save_interval=args.interval),
        "shard_policy": ShardPolicy(
            max_steps=args.max_steps, max_seconds=args.max_seconds, live_seconds=args.live_seconds
        ),
        "if_exists": args.if_exists,
        "run_id": args.run_id,
    }
    if not args.torch:
        w: Hook = Writer(args.out_dir, **common)
        training = None
    else:
        from tensortap.torch import Hook as TorchHook

        training = torch_model()
        w = TorchHook(args.out_dir, include_collections=["weights", "biases"], **common)
        w.register_module(training[0])
        w.attach_optimizer(training[1])
    w.step = args.first_step - 1
    return w, training


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--live-seconds", type=float, default=None, help="default: off (only commands publish)")
    p.add_argument("--if-exists", default="error")
    p.add_argument("--run-id", default=None)
    p.add_argument("--first-step", type=int, default=0)
    p.add_argument("--own-sigterm-handler", action="store_true", help="install one before the writer exists")
    p.add_argument("--default-sigint", action="store_true")
    p.add_argument("--torch", action="store_true")
    p.add_argument("--signal-at", default=None)
    p.add_argument("--signal-in-pool", default=None)
    args = p.parse_args()
    if args.own_sigterm_handler:
        signal.signal(signal.SIGTERM, _own_sigterm_handler)
    w, training = _make_writer(args)
    if args.default_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.signal_at:
        sig, step = args.signal_at.split(":")
        _signal_at(w, getattr(signal, sig), int(step))
    if args.signal_in_pool:
        _signal_in_pool(getattr(signal, args.signal_in_pool))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "steps":
            _steps(w, cmd, args.rank, training)
        elif op == "flush":
            w.flush()
        elif op == "spin":
            print("ok spin", flush=True)
            while True:
                _steps(w, {"n": 1, "names": ["a", "b"]}, args.rank, training)
        elif op == "close":
            w.close()
        elif op == "exit":
            print("ok exit", flush=True)
            return
        else:
            raise ValueError(f"op: unknown {op!r}")
        print(f"ok {op} {w.step}", flush=True)


def _campaign_child(out_dir: str, log: str, seed: int, max_steps: int, max_seconds: float) -> None:
    """Train forever with random pauses; append ``<step> <monotonic time>`` to ``log`` after each step."""
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    w = Writer(out_dir, shard_policy=ShardPolicy(max_steps=max_steps, max_seconds=max_seconds))
    os.write(fd, b"ready\n")
    while True:
        with w.stepping():
            for name in ("a", "b"):
                w.save(name, value_for(name, w.step, 0))
            w.save_scalar("loss", np.float32(w.step))
        os.write(fd, f"{w.step} {time.monotonic()!r}\n".encode())  # unbuffered: survives SIGKILL
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.004)


def fork_server() -> None:
    """Fork one training child per command, so a crash campaign pays the imports once.

    Commands: ``{"op": "run", "out": DIR, "log": FILE, "seed": S, "max_steps": N, "max_seconds": T}``
    answers ``pid <pid>``; ``{"op": "wait", "pid": P}`` answers ``status <returncode>`` (negative:
    the signal that ended it).
    """
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            pid = os.fork()
            if pid == 0:
                try:
                    _campaign_child(cmd["out"], cmd["log"], cmd["seed"], cmd["max_steps"], cmd["max_seconds"])
                finally:
                    os._exit(70)
            print(f"pid {pid}", flush=True)
        elif cmd["op"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            print(f"status {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        fork_server()
    else:
        main()
