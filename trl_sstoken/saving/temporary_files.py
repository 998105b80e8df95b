"""Temporary files named after their writer, so that a later run removes those whose writer is dead.

Writing to a temporary name and renaming into place never leaves a half-written file under the real name, but a
process killed between the two (SIGTERM, SIGKILL, the OOM killer) leaves the temporary file behind, and it can be as
large as the real one (a history cache). So every temporary name carries its writer: host, pid namespace, pid and
the process's start time (`temporary_name`), and `remove_stale` deletes one only when its writer is provably gone:
written on this host and in this pid namespace, by a pid that no longer runs, or that now belongs to a process
started at another time (a reused pid). A file of a live process, of another machine or container, or one whose
writer cannot be told is kept: a live writer's file is never removed.
"""

import os
import re
import shutil
import socket


SUFFIX = ".tmp"


def temporary_name(prefix: str) -> str:
    """`{prefix}.{host}.{pid namespace}.{pid}-{start time}.{random}.tmp`: a fresh name that says who writes it."""
    return f"{prefix}.{_writer(os.getpid())}.{os.urandom(4).hex()}{SUFFIX}"


def remove_stale(directory: str, prefix: str) -> list[str]:
    """Removes the temporary files (or folders) of `directory` named by `temporary_name(prefix)` whose writer is dead;
    returns the names removed. Errors (the directory is gone, a file is read-only, another run removed it first) keep
    the file: cleaning up never fails a run."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    pattern = _name_pattern(prefix)
    host, namespace = _host(), _pid_namespace()
    removed = []
    for name in names:
        match = pattern.match(name)
        if match is None or match["host"] != host or match["namespace"] != namespace:
            continue
        if _is_running(int(match["pid"]), match["start"]):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        removed.append(name)
    return removed


def _name_pattern(prefix: str) -> re.Pattern:
    return re.compile(
        rf"^{re.escape(prefix)}\.(?P<host>[A-Za-z0-9-]{{1,63}})\.(?P<namespace>\d+)\.(?P<pid>\d+)-(?P<start>\d+)"
        rf"\.[0-9a-f]{{8}}{re.escape(SUFFIX)}$"
    )


def _writer(pid: int) -> str:
    return f"{_host()}.{_pid_namespace()}.{pid}-{_start_time(pid) or 0}"


def _host() -> str:
    """The host name with anything but letters, digits and '-' replaced, so it fits in a file name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_namespace() -> str:
    """The inode of this process's pid namespace (Linux); "0" where there is none to read. Two containers on one
    host can have the same host name and the same pids; their namespaces differ."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _is_running(pid: int, start: str) -> bool:
    """Whether the process that wrote a file (`pid`, started at `start`; "0" when that was unknown) still runs."""
    if pid <= 0 or os.name != "posix":
        return True  # not a pid this module writes, or no safe way to probe it (os.kill(pid, 0) kills on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user has this pid
        pass
    except OSError:
        return True
    now = _start_time(pid)
    return start == "0" or now is None or now == start
