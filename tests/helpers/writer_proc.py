"""A NumPy writer process the tests drive line by line over stdin.

Usage: ``python writer_proc.py OUT_DIR [--rank R] [--interval N] [--max-steps N] [--max-seconds S]
[--own-sigterm-handler]``

Each stdin line is a JSON command; the process answers ``ok <op>`` on stdout
once the command is done (``ready`` once the writer exists):

- ``{"op": "steps", "n": 3, "names": ["a"], "mode": "TRAIN", "delay": 0}``: run ``n``
  steps, saving every name with :func:`value_for`, after sleeping ``delay`` seconds.
- ``{"op": "flush"}``: publish everything saved so far and wait for it.
- ``{"op": "spin"}``: save steps forever (publishing all the time) until killed.
- ``{"op": "close"}``: close the writer (end marker ``closed``) and keep running.
- ``{"op": "exit"}``: return from the script without closing (interpreter exit closes).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import numpy as np

from tensortap import SaveConfig
from tensortap.capture import ShardPolicy, Writer


def value_for(name: str, step: int, rank: int) -> np.ndarray:
    """The value the writer of ``rank`` saves under ``name`` at global ``step``."""
    return np.arange(4, dtype=np.float32) + step + 1000 * rank + 0.5 * len(name)


def _steps(w: Writer, cmd: dict, rank: int) -> None:
    time.sleep(cmd.get("delay", 0))
    for _ in range(cmd["n"]):
        with w.stepping(mode=cmd.get("mode")):
            for name in cmd["names"]:
                w.save(name, value_for(name, w.step, rank))


def _own_sigterm_handler(signum: int, frame: object) -> None:
    print("own handler", flush=True)
    sys.exit(3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--own-sigterm-handler", action="store_true", help="install one before the writer exists")
    args = p.parse_args()
    if args.own_sigterm_handler:
        signal.signal(signal.SIGTERM, _own_sigterm_handler)
    w = Writer(
        args.out_dir,
        rank=args.rank,
        save_config=SaveConfig(save_interval=args.interval),
        shard_policy=ShardPolicy(max_steps=args.max_steps, max_seconds=args.max_seconds),
    )
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "steps":
            _steps(w, cmd, args.rank)
        elif op == "flush":
            w.flush()
        elif op == "spin":
            print("ok spin", flush=True)
            while True:
                _steps(w, {"n": 1, "names": ["a", "b"]}, args.rank)
        elif op == "close":
            w.close()
        elif op == "exit":
            print("ok exit", flush=True)
            return
        else:
            raise ValueError(f"op: unknown {op!r}")
        print(f"ok {op} {w.step}", flush=True)


if __name__ == "__main__":
    main()
