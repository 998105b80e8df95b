"""What resume trusts under DeepSpeed and FSDP: their checkpoint files are unpickled by the engines' own loaders
(DeepSpeed's `torch.load(weights_only=False)` of `mp_rank_*_model_states.pt` and the optimizer shards, the DCP
`.metadata` read with `pickle.load`). The marker must cover every such file, whatever its size, and a file changed
or added after the marker was written is refused before any of them is loaded."""

import pickle

import pytest

from trl_sstoken.saving import checkpoints


ENGINE_FILES = {
    # DeepSpeed ZeRO (checkpoint-N/global_stepN/ and the `latest` tag that names it)
    "latest": b"global_step3",
    "global_step3/mp_rank_00_model_states.pt": pickle.dumps({"module": list(range(64))}),
    "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt": pickle.dumps({"state": list(range(64))}),
    # FSDP sharded state dict (torch.distributed.checkpoint)
    "pytorch_model_fsdp_0/.metadata": pickle.dumps({"plan": list(range(64))}),
    "pytorch_model_fsdp_0/__1_0.distcp": bytes(range(200)),
    "adapter_model.safetensors": bytes(300),
    "trainer_state.json": b"{}",
}


@pytest.fixture
def checkpoint(tmp_path):
    """A marked checkpoint folder with the engines' files."""
    folder = tmp_path / "checkpoint-3"
    for relative, payload in ENGINE_FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(payload)
    checkpoints.mark_checkpoint_complete(str(folder), 3, {"history": "lagged"})
    assert checkpoints.checkpoint_problem(str(folder)) is None
    return folder


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only a checksum can tell


@pytest.mark.parametrize(
    "relative",
    [
        "latest",
        "global_step3/mp_rank_00_model_states.pt",
        "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "pytorch_model_fsdp_0/.metadata",
        "pytorch_model_fsdp_0/__1_0.distcp",
    ],
)
def test_an_engine_file_changed_after_the_marker_is_refused_whatever_its_size(checkpoint, relative):
    flip_a_byte(checkpoint / relative)
    problem = checkpoints.checkpoint_problem(str(checkpoint))
    assert problem is not None and relative in problem and "changed after the checkpoint was written" in problem
    with pytest.raises(checkpoints.CheckpointError, match="changed after"):
        checkpoints.resolve_resume(str(checkpoint), str(checkpoint.parent), {"history": "lagged"})


def test_every_file_is_hashed_safetensors_included(checkpoint):
    """Every file, whatever its size and kind (issue 23: a size-only check let a same-size change pass;
    test_resume_checks.py tries it on a 257 MiB file)."""
    marker = checkpoints._read_marker(str(checkpoint / checkpoints.CHECKPOINT_MARKER))[0]
    assert all(len(marker["files"][name]["sha256"]) == 64 for name in ENGINE_FILES)


@pytest.mark.parametrize("relative", ["pytorch_model_fsdp_0/__0_0.distcp", "global_step3/extra_states.pt"])
def test_a_file_added_after_the_marker_is_refused(checkpoint, relative):
    (checkpoint / relative).write_bytes(pickle.dumps("added"))
    problem = checkpoints.checkpoint_problem(str(checkpoint))
    assert problem is not None and relative in problem and "added after the checkpoint was written" in problem
