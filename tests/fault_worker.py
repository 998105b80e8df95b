"""Fault injection for tests/test_faults.py: real SSTokenTrainer runs, SIGKILLed at chosen points, then resumed.

    python tests/fault_worker.py OUT_ROOT [SELECTION]     # prints one JSON object on its last line

The worker imports the libraries once, then forks one process per run (so a run costs its training, not the 10-15 s
of imports). A run installs probes on everything that touches its output directory: each optimizer step's forward,
each part of `Trainer._save_checkpoint` (model, optimizer and scheduler, RNG state, trainer state: before, after,
and "torn", i.e. the files it just wrote truncated to half), and the filesystem calls `os.makedirs`, `open` for
writing, `os.replace`, `os.rename`, `os.remove`/`os.unlink`, `os.rmdir` and `shutil.rmtree` (done file by file, so
a kill can land in the middle of a deletion). Each probe is one numbered event.

1. A reference run records the event list and its final adapter (`save_total_limit=1`, a checkpoint every 2 of 8
   optimizer steps, gradient accumulation 2, LoRA dropout, a lagged history refreshed every 3 steps).
2. For every selected event N: a fresh run SIGKILLs itself (`os.kill(os.getpid(), SIGKILL)`) on reaching event N;
   then a new process resumes with `resume_from_checkpoint=True` and trains to the end; its final adapter is compared
   bit for bit with the reference.

SELECTION: "default" (`STEP_POINTS`, `SAVE_POINTS`, `FINAL_POINTS` below: 23 points, plus `DOUBLE_FAULT`: a
run killed, resumed, killed again during the resumed run's own rotation, resumed again), "saves" (every event of the
checkpoints of steps 4 and 8) or "all" (every event).
"""

import builtins
import json
import os
import re
import shutil
import signal
import sys
import traceback


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import trainer_callback  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trl_sstoken import SSTokenConfig, SSTokenTrainer  # noqa: E402
from trl_sstoken.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


MAX_STEPS = 8
FINAL_ADAPTER = "final_adapter.safetensors"
EVENTS = "events.json"
ERROR = "error.txt"


def rows():
    from importlib import resources

    text = resources.files("trl_sstoken").joinpath("data/quickstart.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()][:32]


def build(out_dir):
    torch.set_num_threads(1)
    data = rows()
    tokenizer = build_tiny_tokenizer([row["prompt"] + row["completion"] for row in data])
    args = SSTokenConfig(
        output_dir=out_dir,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        max_length=64,
        disable_tqdm=True,
        history="lagged",
        history_update_steps=3,
        attention_warmup_ratio=0.25,
    )
    return SSTokenTrainer(
        model=build_tiny_model(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )


class Probes:
    """Numbered events; the process SIGKILLs itself at event number `kill_at`, or at the first event whose name
    matches `kill_at` when it is a string."""

    def __init__(self, out_dir, kill_at=None):
        self.root = os.path.abspath(out_dir)
        self.kill_at = kill_at
        self.events = []
        self.trainer = None
        self.active = True

    def event(self, name, tear=None):
        if not self.active:
            return
        self.events.append(name)
        due = re.search(self.kill_at, name) if isinstance(self.kill_at, str) else len(self.events) == self.kill_at
        if due:
            if tear:
                tear()
            os.kill(os.getpid(), signal.SIGKILL)

    def mine(self, path):
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.root)
        except TypeError:
            return False

    def short(self, path):
        return os.path.relpath(os.path.abspath(os.fspath(path)), self.root)

    def install(self, trainer):
        self.trainer = trainer
        self._filesystem()
        self._trainer_parts(trainer)

    def _step(self):
        return self.trainer.state.global_step

    def _filesystem(self):
        probes = self

        def wrap(module, name, label):
            original = getattr(module, name)

            def probed(path, *args, **kwargs):
                if probes.mine(path):
                    probes.event(f"{label} {probes.short(path)}")
                return original(path, *args, **kwargs)

            setattr(module, name, probed)

        for name in ("makedirs", "mkdir", "remove", "unlink", "rmdir"):
            wrap(os, name, name)
        for name in ("replace", "rename"):
            wrap(os, name, name)
        real_open = builtins.open

        def probed_open(file, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+") and probes.mine(file):
                probes.event(f"open-for-writing {probes.short(file)}")
            return real_open(file, mode, *args, **kwargs)

        builtins.open = probed_open

        def rmtree_file_by_file(path, ignore_errors=False, onerror=None, **kwargs):
            if not probes.mine(path):
                return real_rmtree(path, ignore_errors=ignore_errors, onerror=onerror, **kwargs)
            try:
                for folder, _, files in os.walk(path, topdown=False):
                    for name in sorted(files):
                        os.unlink(os.path.join(folder, name))
                    os.rmdir(folder)
            except OSError:
                if not ignore_errors:
                    raise

        real_rmtree = shutil.rmtree
        shutil.rmtree = rmtree_file_by_file

    def _trainer_parts(self, trainer):
        probes = self

        def around(obj, name, label):
            original = getattr(obj, name)

            def probed(*args, **kwargs):
                folder = next((a for a in args if isinstance(a, str)), None) or kwargs.get("output_dir")
                before = _listing(folder)
                probes.event(f"step {probes._step()}: before {label}")
                result = original(*args, **kwargs)
                written = [p for p, size in _listing(folder).items() if before.get(p) != size]
                probes.event(f"step {probes._step()}: after {label} (torn)", tear=lambda: _tear(written))
                probes.event(f"step {probes._step()}: after {label}")
                return result

            setattr(obj, name, probed)

        around(trainer, "save_model", "save_model")
        around(trainer, "_save_optimizer_and_scheduler", "optimizer and scheduler")
        around(trainer, "_save_rng_state", "rng state")
        around(trainer_callback.TrainerState, "save_to_json", "trainer state")
        forward = trainer._forward_and_select

        def probed_forward(*args, **kwargs):
            probes.event(f"step {probes._step() + 1}: forward (micro-batch {trainer._micro_step})")
            return forward(*args, **kwargs)

        trainer._forward_and_select = probed_forward


def _listing(path):
    folder = path if path and os.path.isdir(path) else os.path.dirname(path or "")
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[path] = os.path.getsize(path)
    return found


def _tear(paths):
    for path in paths:
        if os.path.exists(path):
            os.truncate(path, os.path.getsize(path) // 2)


def child(out_dir, kill_at=None, resume=False, record=False):
    """The body of one forked run: train (resuming or not), save the final adapter, exit."""
    try:
        probes = Probes(out_dir, kill_at)
        trainer = build(out_dir)
        if kill_at is not None or record:
            probes.install(trainer)
        trainer.train(resume_from_checkpoint=True if resume else None)
        probes.active = False  # what follows is the worker's own bookkeeping
        adapter = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if ".default." in n}
        save_file(adapter, os.path.join(out_dir, FINAL_ADAPTER))
        if record:
            with open(os.path.join(out_dir, EVENTS), "w") as handle:
                json.dump(probes.events, handle)
        os._exit(0)
    except BaseException:
        with open(os.path.join(out_dir, ERROR), "w") as handle:
            handle.write(traceback.format_exc())
        os._exit(1)


def fork_run(out_dir, **kwargs):
    """Runs `child` in a forked process; returns its status: 'ok', 'killed' or the error text."""
    os.makedirs(out_dir, exist_ok=True)
    error_file = os.path.join(out_dir, ERROR)
    if os.path.exists(error_file):
        os.remove(error_file)
    pid = os.fork()
    if pid == 0:
        child(out_dir, **kwargs)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "ok"
    if not os.path.exists(error_file):
        return f"exit status {status}"
    with open(error_file) as handle:
        return handle.read().strip().splitlines()[-1]


# The kill points of the default matrix, by event name (regular expressions, each taking its first match in its
# window), so that the same matrix runs against other checkpoint code too (to show what it fails)
STEP_POINTS = [
    r"^step 1: forward \(micro-batch 0\)$",  # before any checkpoint: resume must say there is none
    r"^step 3: forward \(micro-batch 1\)$",  # between two micro-batches of one accumulation window
    r"^step 5: forward \(micro-batch 0\)$",
]
SAVE_POINTS = [  # inside the checkpoint of step 4, the first that deletes an older one (checkpoint-2)
    r"^mkdir checkpoint-4$",
    r"^replace checkpoint-4/.*sstoken_checkpoint_writing",
    r"^step 4: before save_model$",
    r"^open-for-writing checkpoint-4/adapter_config\.json$",
    r"^step 4: after save_model \(torn\)$",
    r"^step 4: after optimizer and scheduler \(torn\)$",
    r"^step 4: before rng state$",
    r"^step 4: after trainer state \(torn\)$",
    r"^step 4: after trainer state$",
    r"^open-for-writing checkpoint-4/.*sstoken_checkpoint_complete\.json",
    r"^replace checkpoint-4/.*sstoken_checkpoint_complete\.json",
    r"^remove checkpoint-4/sstoken_checkpoint_writing$",
    r"^rename checkpoint-2$",
    r"^unlink .*checkpoint-2[^/]*/history/adapter_config\.json$",
    r"^unlink .*checkpoint-2[^/]*/adapter_model\.safetensors$",
    r"^unlink .*checkpoint-2[^/]*/sstoken_checkpoint_complete\.json$",
    r"^unlink .*checkpoint-2[^/]*/training_args\.bin$",
    r"^rmdir .*checkpoint-2[^/]*$",
]
FINAL_POINTS = [  # the last checkpoint (step 8) deleting checkpoint-6
    r"^(rename|unlink) .*checkpoint-6",
    r"^unlink .*checkpoint-6[^/]*/optimizer\.pt$",
]


def select(events, selection):
    """Event numbers (1-based) to kill at."""
    if selection == "all":
        return list(range(1, len(events) + 1))
    if selection == "saves":  # every event of the checkpoint of step 4 and of the final one
        return [i for i in range(1, len(events) + 1) if _in_save(events, i, 4) or _in_save(events, i, MAX_STEPS)]
    numbered = list(enumerate(events, start=1))
    chosen = [_first(numbered, pattern) for pattern in STEP_POINTS]
    chosen += [_first([(i, n) for i, n in numbered if _in_save(events, i, 4)], p) for p in SAVE_POINTS]
    chosen += [_first([(i, n) for i, n in numbered if _in_save(events, i, MAX_STEPS)], p) for p in FINAL_POINTS]
    return sorted({index for index in chosen if index is not None})


DOUBLE_FAULT = (
    r"^unlink .*checkpoint-2[^/]*/adapter_model\.safetensors$",  # the first run, deleting checkpoint-2
    r"^rename checkpoint-4$",  # the resumed run, about to delete checkpoint-4 after marking checkpoint-6
)


def double_fault(root, reference):
    """Killed in the middle of a deletion, resumed and killed again in its own rotation, resumed again to the end."""
    out_dir = os.path.join(root, "double")
    first = fork_run(out_dir, kill_at=DOUBLE_FAULT[0])
    second = fork_run(out_dir, kill_at=DOUBLE_FAULT[1], resume=True)
    left = sorted(name for name in os.listdir(out_dir) if name.startswith(("checkpoint-", ".sstoken-deleting-")))
    resumed = fork_run(out_dir, resume=True)
    result = {
        "index": 0,
        "event": " then ".join(DOUBLE_FAULT),
        "kill": "killed" if first == second == "killed" else f"{first}, {second}",
        "left": left,
        "resume": resumed,
    }
    if resumed == "ok":
        adapter = load_file(os.path.join(out_dir, FINAL_ADAPTER))
        same = adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in reference)
        result["adapter"] = "bit-identical" if same else "DIFFERENT"
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _first(numbered, pattern):
    return next((index for index, name in numbered if re.search(pattern, name)), None)


def _in_save(events, index, step):
    """Whether event `index` comes after the last forward of `step` and before the first of the next step."""
    last_forward = max(i for i, n in enumerate(events, start=1) if n.startswith(f"step {step}: forward"))
    later = [i for i, n in enumerate(events, start=1) if n.startswith(f"step {step + 1}: forward")]
    return last_forward < index < (later[0] if later else len(events) + 1)


def matrix(root, selection="default"):
    reference_dir = os.path.join(root, "reference")
    status = fork_run(reference_dir, record=True)
    if status != "ok":
        return {"error": f"the reference run failed: {status}"}
    with open(os.path.join(reference_dir, EVENTS)) as handle:
        events = json.load(handle)
    reference = load_file(os.path.join(reference_dir, FINAL_ADAPTER))
    first_checkpoint_done = _first(list(enumerate(events, start=1)), r"^step 3: forward")
    results = []
    for index in select(events, selection):
        out_dir = os.path.join(root, f"kill-{index:03d}")
        killed = fork_run(out_dir, kill_at=index)
        result = {"index": index, "event": events[index - 1], "kill": killed}
        if killed == "killed":
            result["left"] = sorted(
                name for name in os.listdir(out_dir) if name.startswith(("checkpoint-", ".sstoken-deleting-"))
            )
            resumed = fork_run(out_dir, resume=True)
            result["resume"] = resumed
            if index < first_checkpoint_done and "No complete checkpoint found" in resumed:
                result["resume"] = "refused: no complete checkpoint yet; a fresh run: " + fork_run(out_dir)
                resumed = "ok" if result["resume"].endswith(": ok") else resumed
            if resumed == "ok":
                adapter = load_file(os.path.join(out_dir, FINAL_ADAPTER))
                same = adapter.keys() == reference.keys() and all(
                    torch.equal(adapter[k], reference[k]) for k in reference
                )
                result["adapter"] = "bit-identical" if same else "DIFFERENT"
        results.append(result)
        shutil.rmtree(out_dir, ignore_errors=True)
    if selection == "default":
        results.append(double_fault(root, reference))
    return {"events": len(events), "results": results}


if __name__ == "__main__":
    if sys.argv[2:3] == ["record"]:
        print(fork_run(sys.argv[1], record=True))  # noqa: T201
    else:
        print(json.dumps(matrix(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "default")))  # noqa: T201
