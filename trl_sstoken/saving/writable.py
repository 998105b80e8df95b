"""Where a run writes, checked at its start: created if missing and probed with a temporary file.

A read-only `output_dir` was found only at the first checkpoint (after the model, the data and the first
`save_steps` steps) or, with `save_strategy="no"`, after the whole run, when the trained adapter could not be
saved; one under a regular file was a raw `NotADirectoryError` from `Trainer.__init__`, after the data and the model
were loaded. A write probe is the only reliable test: `os.access` answers for the permission bits only, and root
passes those whatever they say, while a read-only mount refuses root too.
"""

import os
import tempfile

from ..bounded import bounded_repr


PROBE_PREFIX = ".sstoken-write-check-"


def check_writable_dir(path, name: str, purpose: str = "checkpoints and the trained model are written there") -> None:
    """Creates the folder `path` if it is missing and writes and removes an empty temporary file in it; a
    `ValueError` naming `name` (the field or flag), the path and the reason otherwise."""
    path = os.fspath(path)
    shown = bounded_repr(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        blocker = _file_in_the_way(path)
        reason = f"{bounded_repr(blocker)} is a file, not a folder" if blocker else error.strerror or str(error)
        raise ValueError(
            f"{name}={shown} cannot be created: {reason}. Pass a folder that can be created and written ({purpose})."
        ) from None
    try:
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
    except OSError as error:
        raise ValueError(
            f"{name}={shown} is not writable: {error.strerror or error}. Pass a folder this process can write "
            f"({purpose}), or make it writable."
        ) from None
    os.close(handle)
    os.unlink(probe)


def _file_in_the_way(path: str) -> str | None:
    """The path itself, or the nearest existing folder above it, when that is not a folder."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return None if os.path.isdir(current) else current
