"""Whether the process that writes a worker still runs, seen from a reader on the same machine.

A worker killed with SIGKILL (or ended by ``os._exit``, a segfault, the out-of-memory killer) writes no
end marker, so readers would wait for it for ever. Its worker record names its process (``pid``) and,
on Linux, where that id means that process (``process``: the machine's boot, the PID namespace and the
process's start time); a reader in the same place sees that the process is gone and counts the worker
as ended, reason ``killed``. Elsewhere (another machine, another container, not Linux) nothing is
decided and the worker counts as running until its end marker comes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

KILLED = "killed"
"""The end reason readers give a worker whose process ended without writing its end marker."""


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


@functools.cache
def _place() -> tuple[str, str] | None:
    """This machine's boot id and this process's PID namespace, or None where they cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return boot, os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_record() -> dict[str, Any] | None:
    """What a worker record says of the writing process besides its ``pid`` (``process``), or None.

    Returns
    -------
    dict or None
        ``{"boot_id": ..., "pid_namespace": ..., "start_ticks": ..., "uid": ...}``: the machine's boot,
        the PID namespace in which ``pid`` names the process, the process's start time in clock ticks
        since boot (field 22 of ``/proc/<pid>/stat``, so that a later process given the same id is
        not taken for it) and its user id. None where ``/proc`` does not tell (not Linux).
    """
    place, fields = _place(), _stat_fields("self")
    if place is None or fields is None or len(fields) < 20:
        return None
    return {"boot_id": place[0], "pid_namespace": place[1], "start_ticks": int(fields[19]), "uid": os.getuid()}


def process_gone(info: Mapping[str, Any]) -> bool:
    """Whether the process a worker record ``info`` names has ended, as far as this process can tell.

    Parameters
    ----------
    info
        A worker record (``workers/<worker>.json``).

    Returns
    -------
    bool
        True when the record's process ran on this machine since its last boot, in this PID namespace,
        under this reader's user (or the reader is root), and no process of that id and start time runs
        now (a zombie has ended); False when it runs or when this cannot be told (another machine,
        container or user, an older writer, not Linux).
    """
    pid, proc, place = info.get("pid"), info.get("process"), _place()
    if place is None or not isinstance(proc, dict) or type(pid) is not int or pid <= 0:
        return False
    if (proc.get("boot_id"), proc.get("pid_namespace")) != place:
        return False
    if os.getuid() not in (0, proc.get("uid")):  # /proc may hide other users' processes (hidepid)
        return False
    fields = _stat_fields(pid)
    if fields is None:
        return not os.path.exists(f"/proc/{pid}")  # gone, unless /proc/<pid> exists but cannot be read
    return fields[0] in (b"Z", b"X") or (len(fields) >= 20 and fields[19] != str(proc.get("start_ticks")).encode())
