"""Test-only shim: lets accelerate run FSDP and DeepSpeed on CPU processes over gloo.

accelerate 1.15 decides the engine from the device: `AcceleratorState` turns a run into `DistributedType.FSDP` only
for GPU-like distributed types (`MULTI_GPU`, `MULTI_NPU`, ...; a CPU run stays `MULTI_CPU` and FSDP is silently
dropped), and `PartialState._prepare_backend` gives no backend at all to a process that has no accelerator and is
not `cpu=True` (which is how DeepSpeed must be launched: `use_cpu=True` switches DeepSpeed off). Both engines
themselves work on the CPU: FSDP1/FSDP2 wrap and shard over gloo, and DeepSpeed 0.19 runs with
`DS_ACCELERATOR=cpu`, gloo and a torch optimizer. So, in the tests only (never in the package):

- `AcceleratorState.__init__`: when an FSDP plugin is given (or `ACCELERATE_USE_FSDP=true`) and the state came out
  `MULTI_CPU`, set it to `FSDP` with that plugin, as accelerate does for a GPU;
- `PartialState._prepare_backend`: with `ACCELERATE_USE_DEEPSPEED=true`, no accelerator and a launcher's
  `LOCAL_RANK`, answer `("gloo", MULTI_CPU)`; accelerate then initialises DeepSpeed's comm with gloo and switches
  the type to `DEEPSPEED` as on a GPU.
- the FSDP state's device is `cpu`: accelerate names a CPU process's device `cpu:0` and passes it to FSDP1 as
  `device_id`, which FSDP1 then finds "inconsistent" with the parameters' `cpu`.

Besides the shim, FSDP1 needs `sync_module_states=False` in the tests' fsdp_config (accelerate's param_init_fn for
it asks for a GPU); every process builds the same seeded model, so nothing needs syncing.

`install()` is idempotent and called by tests/distributed/worker.py before any `Accelerator` exists.
"""

import os


def install() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import torch
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    accelerator_state = accelerate_state.AcceleratorState
    partial_state = accelerate_state.PartialState
    if getattr(accelerator_state, "_sstoken_cpu_engines", False):
        return

    original_init = accelerator_state.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        wants_fsdp = fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if fsdp_plugin is not None:
                self.fsdp_plugin = fsdp_plugin
            self.device = torch.device("cpu")  # not "cpu:0", which FSDP1 takes for another device than its params'

    original_backend = partial_state._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original_backend(self, cpu, sagemaker_dp, backend)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if deepspeed and chosen is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    accelerator_state.__init__ = init
    partial_state._prepare_backend = prepare_backend
    accelerator_state._sstoken_cpu_engines = True
