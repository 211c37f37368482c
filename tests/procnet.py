"""Who holds a TCP port, from /proc alone: ``lsof -ti:PORT`` and ``... | xargs kill`` for tests.

Linux only (it reads /proc/net/tcp, /proc/net/tcp6 and /proc/PID/fd). It sees the
network namespace of the calling process and only the processes whose fd directory
it may read (all of them as root; one's own otherwise), as lsof would.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Iterable

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def _port(address: str) -> int:
    """The port of a /proc/net/tcp address (``0100007F:1F90`` or 32 hex digits ``:1F90``)."""
    return int(address.rsplit(":", 1)[1], 16)


def socket_inodes(port: int, tables: Iterable[str] = TABLES) -> set[str]:
    """Inodes of every TCP socket, in any state, whose local or remote port is ``port``.

    Sockets that no process holds (TIME_WAIT, for one) have inode 0 and are left out.
    """
    inodes = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]  # the first line is the header
        except FileNotFoundError:  # no IPv6 in this kernel, say
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10:
                continue
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode != "0" and port in (_port(local), _port(remote)):
                inodes.add(inode)
    return inodes


def pids_on_port(port: int) -> list[int]:
    """Sorted PIDs of the processes holding a TCP socket with ``port`` at either end (``lsof -ti:PORT``)."""
    inodes = socket_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fd_dir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in wanted:
                found.append(int(entry.name))
                break
    return sorted(found)


def kill_by_port(port: int, allowed_pids: Collection[int], signum: int = signal.SIGTERM) -> list[int]:
    """Signal (SIGTERM by default) each process holding ``port`` that is also in ``allowed_pids``
    (those the test started itself); return the sorted PIDs signalled. Others are left alone."""
    killed = []
    for pid in pids_on_port(port):
        if pid not in allowed_pids:
            continue
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # it exited between the look-up and now
            continue
        killed.append(pid)
    return killed
