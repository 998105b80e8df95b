"""Progress lines and incrementally written JSON for the GPU check (standard library only).

Every stage writes its JSON after each sub-step, so a run cut short by a timeout still returns what it measured.
A sub-step that raises is recorded as failed (with the error) and the next one runs; one that cannot run here is
recorded as skipped, always with the reason.
"""

import json
import os
import sys
import tempfile
import time
import traceback


# one clock for the whole check: check.py exports its start time to every stage process
START = float(os.environ.setdefault("GPU_CHECK_START", str(time.time())))


def log(stage: str, message: str):
    print(f"[gpu-check +{time.time() - START:6.1f}s] {stage}: {message}", flush=True)


def write_json(path: str, data):
    """Atomic write: a reader (or a kill) never sees half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(data, file, indent=2, default=_default)
    os.replace(temporary, path)


def _default(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
    except ImportError:
        pass
    return repr(value)


class Skip(Exception):
    """Raised by a sub-step that cannot run here; its message is the recorded reason."""


class StageRecorder:
    """The JSON of one stage: {"stage", "status", "substeps": {name: {"status", "seconds", ...}}, ...}."""

    def __init__(self, path: str, stage: str, deadline: float):
        self.path, self.stage, self.deadline = path, stage, deadline
        self.data = {"stage": stage, "status": "running", "substeps": {}}
        self.write()

    def write(self):
        write_json(self.path, self.data)

    def log(self, message: str):
        log(self.stage, message)

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, function, needs_seconds: float = 0.0):
        """Runs `function(entry)`; `entry` is the sub-step's dict, written as it is filled. Never raises."""
        entry = {"status": "running"}
        self.data["substeps"][name] = entry
        left = self.seconds_left()
        if left < needs_seconds:
            entry.update(
                status="skipped",
                reason=f"stage time budget: {left:.0f} s left, this sub-step needs ~{needs_seconds:.0f} s",
            )
            self.log(f"{name}: skipped ({entry['reason']})")
            self.write()
            return entry
        self.write()  # the sub-step shows as "running" in the JSON while it runs
        began = time.time()
        try:
            function(entry)
            entry["status"] = "ok"
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
        except BaseException as error:  # noqa: BLE001 - one failure must not stop the next sub-step
            entry.update(
                status="failed",
                error=f"{type(error).__name__}: {error}"[:2000],
                traceback=traceback.format_exc()[-4000:],
            )
            _free_cuda_memory()
            if isinstance(error, KeyboardInterrupt):
                raise
        entry["seconds"] = round(time.time() - began, 2)
        detail = entry.get("reason") or entry.get("error") or ""
        self.log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s {detail[:300]}")
        self.write()
        return entry

    def finish(self, **extra):
        self.data.update(extra)
        statuses = [entry["status"] for entry in self.data["substeps"].values()]
        self.data["status"] = "failed" if "failed" in statuses else "ok"
        self.write()
        self.log(f"stage {self.data['status']}")
        return 0


def _free_cuda_memory():
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
