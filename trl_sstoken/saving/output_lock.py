"""One training run per output_dir: an exclusive lock, held while the run trains, that names its holder.

Two runs training into one output_dir replace and delete each other's checkpoint folders (they died with a raw
`FileExistsError` or `FileNotFoundError`, or worse, resumed from the other's state). So a run takes an exclusive
`flock` on `output_dir/_trl_sstoken.lock` for the whole of `train()`, and the `trl-sstoken` command line from before it
loads anything until it has saved (and pushed). The kernel releases the lock when its process ends, however it ends
(SIGKILL, OOM), so a lock is never stale and the file may stay; its content (pid, host, start time, command) only
names the holder in the error a second run gets. The leading `_` keeps the file out of `push_to_hub` uploads
(`Trainer` ignores `_*`), and the holder's details are erased when it releases the lock.

- In a multi-process run (DDP, FSDP, DeepSpeed) every rank shares the output_dir, so only the main process (global
  rank 0) takes the lock; all ranks learn its outcome before any raises, so no rank is left waiting in a collective.
- Within one process the lock belongs to an owner: the command line's lock (`owner=None`) admits its trainer, and a
  trainer's lock admits its own nested calls, but a second trainer of the same process training into the same
  output_dir at the same time is refused like another process.
- Platforms without `fcntl` (Windows) have no lock.
"""

import datetime
import json
import os
import socket
import sys
import threading
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = "_trl_sstoken.lock"
_MAX_SHOWN = 300  # characters of a path or a command shown in an error


class OutputDirInUseError(ValueError):
    """The output_dir is being trained into by another run (another process, or another trainer of this one)."""


@dataclass
class _Hold:
    descriptor: int
    owner: object  # None: the whole process (the command line)
    pid: int  # a forked child inherits the table, not the hold
    count: int = 1


_held: dict[str, _Hold] = {}
_guard = threading.Lock()


@contextmanager
def output_dir_locked(output_dir: str, owner=None):
    """Holds the lock of `output_dir` (created if needed) for the `with` block; raises `OutputDirInUseError` naming
    the holder when another process, or another owner in this process, holds it."""
    key = _acquire(output_dir, owner)
    try:
        yield
    finally:
        _release(key)


@contextmanager
def run_locked(args, owner):
    """`output_dir_locked(args.output_dir, owner)` on the main process of a run; every process raises the main
    process's error, so the ranks of a distributed run fail together."""
    with ExitStack() as stack:
        problem = None
        if args.process_index == 0:
            try:
                stack.enter_context(output_dir_locked(args.output_dir, owner))
            except OutputDirInUseError as error:
                problem = error
        message = _main_process_message(str(problem) if problem is not None else None)
        if problem is not None:
            raise problem
        if message is not None:
            raise OutputDirInUseError(message)
        yield


def check_output_dir_free(args, owner) -> None:
    """Raises `OutputDirInUseError` now if another run trains into `args.output_dir` (when a trainer is built, so the
    error comes before the data is prepared); `train()` takes the lock itself."""
    with run_locked(args, owner):
        pass


def _acquire(output_dir: str, owner) -> str | None:
    if fcntl is None:
        return None
    key = os.path.realpath(output_dir)
    with _guard:
        hold = _held.get(key)
        if hold is not None and hold.pid != os.getpid():
            del _held[key]  # inherited through fork: the lock is the parent's
            hold = None
        if hold is not None:
            if hold.owner is not None and hold.owner is not owner:
                raise OutputDirInUseError(_in_use(output_dir, f"another trainer of this process (pid {os.getpid()})"))
            hold.count += 1
            return key
        path = os.path.join(key, LOCK_FILE)
        try:
            os.makedirs(key, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as error:
            raise OutputDirInUseError(
                f"output_dir={_shown(output_dir)} cannot be written ({error.strerror or error}): the run could "
                f"not take its lock {LOCK_FILE} there, nor save checkpoints. Set output_dir to a writable directory."
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            holder = _describe_holder(descriptor)
            os.close(descriptor)
            raise OutputDirInUseError(_in_use(output_dir, holder)) from None
        except OSError as error:  # a filesystem without locks
            os.close(descriptor)
            warnings.warn(
                f"output_dir={_shown(output_dir)} cannot be locked ({error.strerror or error}; its filesystem has no "
                "flock): nothing stops a second run from training into it at the same time.",
                stacklevel=4,
            )
            return None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(_holder_details()).encode() + b"\n", 0)
        _held[key] = _Hold(descriptor, owner, os.getpid())
        return key


def _release(key: str | None) -> None:
    if key is None:
        return
    with _guard:
        hold = _held.get(key)
        if hold is None or hold.pid != os.getpid():
            return
        hold.count -= 1
        if hold.count > 0:
            return
        del _held[key]
        try:
            os.ftruncate(hold.descriptor, 0)  # no pid or host left behind
        except OSError:
            pass
        os.close(hold.descriptor)  # releases the flock


def _holder_details() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(sys.argv)[:_MAX_SHOWN],
    }


def _describe_holder(descriptor: int) -> str:
    """ "process 123 on host h (since ..., running '...')", read from the lock file, or what is known without it."""
    try:
        details = json.loads(os.pread(descriptor, 4096, 0).decode())
        pid, host = int(details["pid"]), str(details["host"])[:_MAX_SHOWN]
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet, or they cannot be read)"
    since = f"since {str(details.get('started'))[:40]}, " if details.get("started") else ""
    command = str(details.get("command", ""))[:_MAX_SHOWN]
    return f"process {pid} on host {host} ({since}running {command!r})"


def _in_use(output_dir: str, holder: str) -> str:
    return (
        f"output_dir={_shown(output_dir)} is in use by another training run: {holder} holds its lock "
        f"{os.path.join(_shown_path(output_dir), LOCK_FILE)}. Two runs training into one output_dir replace and "
        "delete each other's checkpoints. Wait for that run to end or stop it, or set output_dir to another directory."
    )


def _shown(output_dir: str) -> str:
    return repr(_shown_path(output_dir))


def _shown_path(output_dir: str) -> str:
    text = os.fspath(output_dir)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _main_process_message(message: str | None) -> str | None:
    """The main process's `message`, on every process of a distributed run (a collective: all must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return message
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
