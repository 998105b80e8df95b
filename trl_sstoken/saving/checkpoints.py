"""Checkpoints that survive a crash at any point, and a resume that loads only what verifies.

`Trainer` writes `checkpoint-N/` in place, file after file, and then deletes older checkpoints
(`save_total_limit`). A process killed in the middle can leave a folder that looks like a checkpoint but lacks
files, or, during the deletion, an older checkpoint with only some of its files. `SSTokenTrainer` saves by this
protocol (`save_checkpoint`):

1. a stale `checkpoint-N/` (left by an interrupted or abandoned run) is moved aside and deleted, then the folder is
   created with a `sstoken_checkpoint_writing` sentinel: a folder with it and no marker was interrupted;
2. `Trainer` writes everything, with its own rotation held back;
3. every file is flushed to disk, and the marker `sstoken_checkpoint_complete.json` is written atomically (temporary
   file, fsync, rename). It records each file's size and SHA-256 (every file, whatever its size, read in 1 MiB
   blocks), the settings a resume must match (`resume.py`) and whether the checkpoint was saved with
   `save_only_model`; then the sentinel is removed;
4. only then are older checkpoints deleted: each is first renamed to a hidden `.sstoken-deleting-*` folder (one
   atomic step), then removed. The checkpoint just marked and the best one are never deleted.

Resuming (`resolve_resume`) verifies a checkpoint against its marker (every recorded file present with its size and
hash, every file the run needs recorded, no link leading out of the checkpoint, not a `save_only_model` one) and the
run's settings against the recorded ones (each of them recorded), and refuses, naming the file or the setting and
what to do, instead of loading something partial. `resume_from_checkpoint=True` (or the CLI's `"true"`) takes the newest
checkpoint that verifies.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager

from .temporary_files import remove_stale, temporary_name


CHECKPOINT_MARKER = "sstoken_checkpoint_complete.json"
WRITING_SENTINEL = "sstoken_checkpoint_writing"
MARKER_FORMAT = "trl_sstoken.checkpoint/3"  # 3: every file hashed, the settings of resume.py, save_only_model
HASH_BLOCK_BYTES = 1 << 20
TRASH_PREFIX = ".sstoken-deleting-"
TEMPORARY_PREFIX = ".sstoken-tmp-"  # + the file's name: `_write_atomically`'s temporary files
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0", "none", "")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, interrupted, damaged, or made with other settings."""


# ----- writing -----


def save_checkpoint(trainer, write, settings: dict, trial=None) -> str:
    """Writes `checkpoint-{global_step}` of `trainer` by the protocol above; `write()` is `Trainer._save_checkpoint`,
    `settings` what a resume must match (`resume.checkpoint_settings`)."""
    run_dir = trainer._get_output_dir(trial=trial)
    checkpoint = os.path.join(run_dir, f"checkpoint-{trainer.state.global_step}")
    if trainer.args.should_save:
        begin_checkpoint(checkpoint)
    trainer.accelerator.wait_for_everyone()  # no process writes into the folder before it is fresh
    with rotation_deferred():
        write()
    trainer.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
    if trainer.args.should_save:
        mark_checkpoint_complete(
            checkpoint, trainer.state.global_step, settings, save_only_model=trainer.args.save_only_model
        )
        rotate_checkpoints(
            run_dir, trainer.args.save_total_limit, newest=checkpoint, best=trainer.state.best_model_checkpoint
        )
    return checkpoint


def begin_checkpoint(checkpoint: str) -> None:
    """A fresh folder for a checkpoint, marked as being written."""
    if os.path.lexists(checkpoint):
        delete_checkpoint(checkpoint)
    os.makedirs(checkpoint)
    _write_atomically(os.path.join(checkpoint, WRITING_SENTINEL), b"")


@contextmanager
def rotation_deferred():
    """Holds back the rotation `Trainer._save_checkpoint` runs at its end (`transformers.trainer.rotate_checkpoints`),
    so that older checkpoints are deleted only after the new one is marked complete."""
    import transformers.trainer as hf_trainer

    if not hasattr(hf_trainer, "rotate_checkpoints"):
        raise RuntimeError(
            "transformers.trainer.rotate_checkpoints is gone (transformers changed how it deletes old checkpoints); "
            "SSTokenTrainer cannot make its checkpoints crash-safe with this version. Pin transformers as in "
            "pyproject.toml."
        )
    original = hf_trainer.rotate_checkpoints
    hf_trainer.rotate_checkpoints = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hf_trainer.rotate_checkpoints = original


def mark_checkpoint_complete(checkpoint: str, global_step: int, settings: dict, save_only_model: bool = False) -> None:
    """Flushes every file of `checkpoint` to disk, then records them (size and SHA-256), `settings` and whether it
    holds only the model (`save_only_model`) in the marker, atomically."""
    files = {}
    for relative in _checkpoint_files(checkpoint):
        path = os.path.join(checkpoint, relative)
        files[relative] = _describe(path, fsync=True)
    for folder in {os.path.dirname(os.path.join(checkpoint, r)) for r in files} | {checkpoint}:
        _fsync_directory(folder)
    marker = {
        "format": MARKER_FORMAT,
        "global_step": global_step,
        "save_only_model": bool(save_only_model),
        "settings": settings,
        "files": files,
    }
    _write_atomically(os.path.join(checkpoint, CHECKPOINT_MARKER), json.dumps(marker, indent=1).encode())
    sentinel = os.path.join(checkpoint, WRITING_SENTINEL)
    if os.path.exists(sentinel):
        os.remove(sentinel)
        _fsync_directory(checkpoint)


def rotate_checkpoints(run_dir: str, save_total_limit, newest: str, best: str | None = None) -> None:
    """Deletes what `save_total_limit` no longer keeps, after `newest` was marked complete.

    Counted are the complete checkpoints up to `newest`'s step; the oldest go first; `newest` and `best` are never
    deleted. Incomplete checkpoint folders older than `newest` (interrupted saves, never resumable) are deleted too,
    and so are leftovers of an interrupted deletion. Checkpoints of later steps (left by an abandoned run) are
    not touched: they are replaced when this run reaches their step.
    """
    remove_deletion_leftovers(run_dir)
    if save_total_limit is None or save_total_limit <= 0:
        return
    newest_step = checkpoint_step(newest)
    protected = {os.path.abspath(newest)} | ({os.path.abspath(best)} if best else set())
    complete, incomplete, kept = [], [], 0
    for step, path in numbered_checkpoints(run_dir):
        if step > newest_step:
            continue
        if os.path.abspath(path) in protected:
            kept += 1
        elif _has_marker(path):
            complete.append(path)
        else:
            incomplete.append(path)
    for path in incomplete:
        delete_checkpoint(path)
    excess = len(complete) + kept - max(save_total_limit, kept)
    for path in complete[: max(excess, 0)]:  # oldest first
        delete_checkpoint(path)


def delete_checkpoint(checkpoint: str) -> None:
    """Renames the folder out of the `checkpoint-N` namespace (atomic), then removes it: a crash in between leaves
    a hidden leftover, never a half-deleted checkpoint."""
    parent, name = os.path.split(os.path.abspath(checkpoint))
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(checkpoint, trash)
    except FileNotFoundError:  # another process deleted it first
        return
    _fsync_directory(parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_deletion_leftovers(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith(TRASH_PREFIX):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


# ----- resuming -----


def parse_resume_argument(value):
    """`resume_from_checkpoint` as `train()` takes it: True, None (a fresh run) or a path. The strings "true" and
    "false" (any case; also yes/no/1/0/none, and "" for none), as the command line passes them, are read as such."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise CheckpointError(
            f"resume_from_checkpoint must be True, False, None or a checkpoint path; got {value!r} "
            f"({type(value).__name__})."
        )
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return None
    return value


def resolve_resume(value, output_dir: str, settings: dict, essential_files=(), pending=()):
    """The verified checkpoint path to resume from, or None for a fresh run. Raises `CheckpointError` naming the
    problem and the way forward.

    `essential_files`: the files every checkpoint of the run holds (`resume.essential_files`), each a tuple of
    alternatives, one of which the marker must record. `pending`: recorded settings the caller checks later (the
    CLI checks the training set's identity once the data is loaded).
    """
    value = parse_resume_argument(value)
    if value is None:
        return None
    if value is True:
        return last_complete_checkpoint(output_dir, settings, essential_files, pending)
    problem = checkpoint_problem(value, essential_files)
    if problem is not None:
        raise CheckpointError(f"Cannot resume from {value}: {problem}")
    check_settings(value, settings, pending)
    return value


def last_complete_checkpoint(output_dir: str, settings: dict | None = None, essential_files=(), pending=()) -> str:
    """The highest-step `checkpoint-N` of `output_dir` that verifies against its marker (and holds every one of
    `essential_files`); others are skipped with a warning that says why. With `settings`, the chosen one must also
    have been made with them."""
    if not os.path.isdir(output_dir):
        raise CheckpointError(
            f"resume_from_checkpoint=True, but the output directory {output_dir} does not exist, so there is no "
            "checkpoint to resume from. Start without resume_from_checkpoint, or set output_dir to the run's folder."
        )
    skipped = []
    for _, path in reversed(numbered_checkpoints(output_dir)):
        problem = checkpoint_problem(path, essential_files)
        if problem is None:
            if settings is not None:
                check_settings(path, settings, pending)
            return path
        skipped.append(f"{os.path.basename(path)}: {problem}")
        warnings.warn(f"Skipping the checkpoint {path}: {problem}", stacklevel=3)
    found = "; ".join(skipped) if skipped else "there is no checkpoint-N folder"
    raise CheckpointError(
        f"No complete checkpoint found in output directory ({output_dir}): {found}. Start without "
        "resume_from_checkpoint (a fresh run), or pass the path of a checkpoint from elsewhere."
    )


def checkpoint_problem(checkpoint: str, essential_files=()) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None if it was saved to be resumed (not `save_only_model`), no
    link in it leads out of it, its marker records each of `essential_files` (one of each tuple of alternatives) and
    every shard a recorded index names, and every file the marker records is there, unchanged."""
    if not os.path.exists(checkpoint):
        return "the path does not exist. Check for a typo, or pass resume_from_checkpoint=True to take the last complete checkpoint of output_dir."
    if not os.path.isdir(checkpoint):
        return "it is a file, not a checkpoint folder."
    marker_path = os.path.join(checkpoint, CHECKPOINT_MARKER)
    if not os.path.exists(marker_path):
        if os.path.exists(os.path.join(checkpoint, WRITING_SENTINEL)):
            return (
                f"writing it was interrupted (it has {WRITING_SENTINEL} and no {CHECKPOINT_MARKER}). Resume from an "
                "earlier checkpoint, or pass resume_from_checkpoint=True to take the last complete one."
            )
        if os.path.exists(os.path.join(checkpoint, "trainer_state.json")):
            return (
                f"it is not a checkpoint of SSTokenTrainer (it has no {CHECKPOINT_MARKER}): a plain Trainer or "
                "SFTTrainer checkpoint holds neither the history state nor a record of its files, so it cannot be "
                "resumed exactly. Start a new run; to start from its weights, load its adapter (or model) first."
            )
        return (
            f"it is not a checkpoint (no {CHECKPOINT_MARKER}, no trainer_state.json); checkpoints are the "
            "checkpoint-N folders inside output_dir."
        )
    marker, problem = _read_marker(marker_path)
    if problem is not None:
        return problem
    if marker["save_only_model"]:
        return (
            "it was saved with save_only_model=True: it holds the weights but not the optimizer, scheduler and RNG "
            "states, so the run cannot be resumed exactly from it. Start a new run from its weights (load its "
            "adapter or model), or train with save_only_model=False to write checkpoints that resume."
        )
    link = _link_out_of(checkpoint)
    if link is not None:
        return (
            f"{link[0]} is a link to {link[1]}, outside the checkpoint: what it points to is not part of the "
            "checkpoint and can change without the marker noticing. Copy the files into the checkpoint instead of "
            "linking them, or resume from another checkpoint."
        )
    files = marker["files"]
    for alternatives in [*essential_files, *_index_shards(checkpoint, files)]:
        if not any(name in files for name in alternatives):
            named = " or ".join(alternatives)
            return (
                f"the file {named} is not recorded in its marker, but every checkpoint of this run holds it (a "
                "marker written without it, or edited). Resume from another checkpoint."
            )
    unrecorded = sorted(set(_checkpoint_files(checkpoint)) - set(files))
    if unrecorded:  # an engine may load it (DeepSpeed and FSDP read their folders by name), unverified
        return (
            f"the file {unrecorded[0]} was added after the checkpoint was written (the marker does not record it"
            f"{f', nor {len(unrecorded) - 1} other(s)' if len(unrecorded) > 1 else ''}). Resume from another "
            "checkpoint, or remove the files you added."
        )
    for relative, expected in sorted(files.items()):
        path = os.path.join(checkpoint, relative)
        if not os.path.isfile(path):
            return (
                f"the file {relative} is missing (the marker records it as part of the checkpoint; a crash while an "
                "older checkpoint was being deleted, or a manual deletion). Resume from another checkpoint."
            )
        actual = _describe(path)
        if actual["size"] != expected.get("size"):
            return (
                f"the file {relative} has {actual['size']} bytes, the marker records {expected.get('size')} "
                "(truncated or replaced). Resume from another checkpoint."
            )
        if actual["sha256"] != expected["sha256"]:
            return (
                f"the file {relative} changed after the checkpoint was written (its SHA-256 differs from the "
                "marker's). Resume from another checkpoint."
            )
    return None


def check_settings(checkpoint: str, settings: dict, pending=()) -> None:
    """Refuses to resume `checkpoint` with settings other than those it was made with (`resume.checkpoint_settings`),
    naming each differing one with its value there and now; every one of `settings` must be recorded. `pending`:
    recorded settings the caller checks later, not yet known."""
    marker, problem = _read_marker(os.path.join(checkpoint, CHECKPOINT_MARKER))
    if problem is not None:
        raise CheckpointError(f"Cannot resume from {checkpoint}: {problem}")
    recorded = marker["settings"]
    unrecorded = [name for name in settings if name not in recorded]
    if unrecorded:
        raise CheckpointError(
            f"Cannot resume from {checkpoint}: its {CHECKPOINT_MARKER} does not record the settings "
            f"{', '.join(unrecorded)}, so whether this run matches them cannot be checked (a marker written by other "
            "code, or edited). Resume from another checkpoint, or start a new run."
        )
    differing = [name for name in settings if recorded[name] != settings[name]]
    differing += [name for name in recorded if name not in settings and name not in pending]
    if differing:
        details = "; ".join(f"{name}: {recorded.get(name)!r} there, {settings.get(name)!r} now" for name in differing)
        raise CheckpointError(
            f"Cannot resume from {checkpoint}: it was made with other settings ({details}). Resuming would continue "
            "another experiment from this one's state (what is selected, the data and its order, and the optimizer "
            "and scheduler states are the checkpoint's; a new learning rate, for one, would be ignored). Resume with "
            "the checkpoint's settings, or start a new run in another output_dir (its adapter or model can be the "
            "starting point). docs/reliability.md lists what a resume must match."
        )


# ----- loading -----


@contextmanager
def adapters_loaded_in_place(model):
    """Makes `Trainer._load_from_checkpoint` restore PEFT adapters into their existing parameters, in their dtype.

    PEFT's `load_adapter` upcasts bf16/fp16 adapter weights to fp32 by *replacing* the parameters
    (`cast_adapter_dtype`, `autocast_adapter_dtype=True`). Under QLoRA the adapters train in bf16, so a resumed run
    went on in fp32 (other losses), and every reference held to the old parameters (the history's pairing of its
    adapter with the trained one) updated orphaned tensors. Loading without the cast keeps both exact.
    """
    if not (hasattr(model, "load_adapter") and hasattr(model, "peft_config")):
        yield
        return
    before = {name: (param, param.dtype, param.requires_grad) for name, param in model.named_parameters()}
    model.load_adapter = functools.partial(type(model).load_adapter, model, autocast_adapter_dtype=False)
    try:
        yield
    finally:
        del model.load_adapter
    after = dict(model.named_parameters())
    replaced = [name for name, (param, _, _) in before.items() if after.get(name) is not param]
    if replaced:
        raise RuntimeError(
            f"Loading the checkpoint replaced {len(replaced)} parameter(s) (e.g. {replaced[0]}) instead of loading "
            "into them; the resumed run would not continue the checkpointed one exactly."
        )
    for name, (param, dtype, requires_grad) in before.items():
        if param.dtype != dtype:
            raise RuntimeError(f"Loading the checkpoint changed the dtype of {name} from {dtype} to {param.dtype}.")
        param.requires_grad_(requires_grad)  # load_adapter(is_trainable=...) may flip flags (peft#3580)


# ----- helpers -----


def numbered_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder of `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def checkpoint_step(checkpoint: str) -> int:
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    if match is None:
        raise ValueError(f"{checkpoint} is not named checkpoint-N.")
    return int(match.group(1))


def _read_marker(path: str) -> tuple[dict | None, str | None]:
    """(marker, None), or (None, why it cannot be used)."""
    try:
        with open(path, encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError) as error:
        return None, f"its {CHECKPOINT_MARKER} is damaged ({error}). Resume from another checkpoint."
    if not isinstance(marker, dict):
        return None, f"its {CHECKPOINT_MARKER} is damaged (not a JSON object). Resume from another checkpoint."
    if "format" not in marker:
        return None, (
            f"its {CHECKPOINT_MARKER} was written by an older trl_sstoken that did not record the checkpoint's files "
            "and settings, so it cannot be verified. Resume it with that version, or start a new run."
        )
    if marker["format"] == "trl_sstoken.checkpoint/2":
        return None, (
            f"its {CHECKPOINT_MARKER} was written by an older trl_sstoken (format 2), which hashed only files up to "
            "256 MiB and recorded fewer of the settings a resume must match, so it cannot be verified. Resume it "
            "with that version, or start a new run from its weights."
        )
    if marker["format"] != MARKER_FORMAT:
        return (
            None,
            f"its {CHECKPOINT_MARKER} has format {marker['format']!r}; this trl_sstoken reads {MARKER_FORMAT!r}.",
        )
    files, settings = marker.get("files"), marker.get("settings")
    if (
        not isinstance(files, dict)
        or not isinstance(settings, dict)
        or not isinstance(marker.get("save_only_model"), bool)
        or not all(_is_file_entry(name, entry) for name, entry in files.items())
    ):
        return (
            None,
            f"its {CHECKPOINT_MARKER} is damaged (no record of files or settings). Resume from another checkpoint.",
        )
    return marker, None


def _is_file_entry(name: str, entry) -> bool:
    """A relative path inside the checkpoint, with an integer size and a SHA-256."""
    return (
        isinstance(entry, dict)
        and not os.path.isabs(name)
        and ".." not in name.split(os.sep)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def _link_out_of(checkpoint: str) -> tuple[str, str] | None:
    """(relative path, target) of the first symbolic link in `checkpoint` that resolves outside it, or None.

    The walk does not follow links, so what a linked folder holds would otherwise never be recorded, and a linked
    file's content could change elsewhere. Links that stay inside the checkpoint are harmless: their targets are
    recorded and verified themselves.
    """
    root = os.path.realpath(checkpoint)
    for folder, folders, names in os.walk(checkpoint):
        for name in sorted(folders + names):
            path = os.path.join(folder, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.commonpath([root, target]) != root:
                    return os.path.relpath(path, checkpoint), target
    return None


def _index_shards(checkpoint: str, files: dict) -> list[tuple[str]]:
    """The shards each recorded weights index (`*.index.json`) names: a checkpoint holds every one of them."""
    shards = []
    for name in sorted(files):
        if not name.endswith(".index.json"):
            continue
        try:
            with open(os.path.join(checkpoint, name), encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue  # missing or damaged: the file check names it
        folder = os.path.dirname(name)
        shards += [(os.path.join(folder, shard),) for shard in sorted(set(map(str, weight_map.values())))]
    return shards


def _has_marker(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, CHECKPOINT_MARKER))


def _checkpoint_files(checkpoint: str) -> list[str]:
    files = []
    for folder, _, names in os.walk(checkpoint):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), checkpoint)
            if relative not in (CHECKPOINT_MARKER, WRITING_SENTINEL) and not name.startswith(TEMPORARY_PREFIX):
                files.append(relative)
    return sorted(files)


def _describe(path: str, fsync: bool = False) -> dict:
    """Size and SHA-256 of a file, read in blocks, whatever its size (a 336 MB adapter: 0.3-0.7 s at the 0.5-1.1 GB/s
    measured in docs/reliability.md); with `fsync`, flushed to disk too."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
        if fsync:
            os.fsync(handle.fileno())
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _write_atomically(path: str, payload: bytes) -> None:
    """Temporary file (named after its writer, `temporary_files.py`), fsync, rename; then the temporary files that
    dead writers left for the same name in `folder` are removed."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, temporary_name(f"{TEMPORARY_PREFIX}{name}"))
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync_directory(folder)
    remove_stale(folder, f"{TEMPORARY_PREFIX}{name}")


def _fsync_directory(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(descriptor)
