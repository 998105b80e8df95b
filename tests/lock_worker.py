"""Under torchrun: each rank of a run checks its output_dir's lock and prints what it found, as one JSON line.

    python -m torch.distributed.run --nproc_per_node 2 tests/lock_worker.py OUTPUT_DIR

Used by tests/test_output_lock.py: when another process holds the lock, every rank must raise, not only the main one
(a rank that went on alone would wait forever in the run's first collective).
"""

import json
import os
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from trl_sstoken import SSTokenConfig  # noqa: E402
from trl_sstoken.saving.output_lock import OutputDirInUseError, check_output_dir_free  # noqa: E402


args = SSTokenConfig(output_dir=sys.argv[1], use_cpu=True, bf16=False, report_to="none")
try:
    check_output_dir_free(args, owner=object())
    found = None
except OutputDirInUseError as error:
    found = str(error)
sys.stdout.write(json.dumps({"rank": args.process_index, "error": found}) + "\n")
dist.destroy_process_group()  # a clean exit (gloo aborts a process that leaves with its group alive)
