"""The --config YAML file, read within limits (size, values an alias expands to, nesting), with duplicate keys refused,
and every value an error message echoes bounded in length (trl_sstoken/cli/config_file.py, trl_sstoken/bounded.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_sstoken import SSTokenConfig, cli
from trl_sstoken.bounded import REPR_LIMIT, TEXT_LIMIT, bounded_repr, bounded_text
from trl_sstoken.cli.config_file import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, read_config_file


REPO = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML list of `width ** levels` strings in a few hundred bytes ("billion laughs"): every level lists the
    level below once in full, with an anchor, and `width - 1` times more through its alias."""
    value = "&l0 [" + ", ".join(["lol"] * width) + "]"
    for level in range(1, levels):
        value = f"&l{level} [" + ", ".join([value] + [f"*l{level - 1}"] * (width - 1)) + "]"
    return value


def write(tmp_path, text: str, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_at_once_by_the_cli(tmp_path):
    """The issue's case: an alias bomb as selection_method made `trl-sstoken train` hang (the error message printed
    its repr, millions of items). Run in a subprocess so that a regression fails on the timeout instead of hanging."""
    bomb = f"model_name_or_path: m\nuse_peft: true\nselection_method: {alias_bomb(7)}\n"  # 9**7 = 4.8 million items
    config = write(tmp_path, bomb)
    assert len(bomb) < 1200
    result = subprocess.run(
        [sys.executable, "-m", "trl_sstoken.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"expands to more than {MAX_CONFIG_VALUES} values" in result.stderr
    assert f"{config}:3:" in result.stderr  # the line of selection_method
    assert len(result.stderr) < 2000


def test_alias_bombs_recursive_aliases_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"run.yaml:1:\d+: not valid YAML: a value that expands to more than"):
        read_config_file(write(tmp_path, f"selection_method: {alias_bomb(5)}\n"))  # 59049 items
    with pytest.raises(ValueError, match=r"the alias \*loop is used inside the value it names"):
        read_config_file(write(tmp_path, "lora_target_modules: &loop [q_proj, *loop]\n"))
    nested = "[" * (MAX_CONFIG_DEPTH + 1) + "]" * (MAX_CONFIG_DEPTH + 1)
    with pytest.raises(ValueError, match=rf"nested more than {MAX_CONFIG_DEPTH} levels deep"):
        read_config_file(write(tmp_path, f"model_init_kwargs: {nested}\n"))
    deep = "[" * 100_000 + "]" * 100_000  # would exhaust Python's recursion in PyYAML's composer
    with pytest.raises(ValueError, match=r"nested more than"):
        read_config_file(write(tmp_path, f"a: {deep}\n"))


def test_aliases_and_merge_keys_within_the_limits_read_as_pyyaml_reads_them(tmp_path):
    text = (
        "lora_target_modules: &targets [q_proj, v_proj]\n"
        "model_init_kwargs: &kwargs {dtype: float32, attn_implementation: eager}\n"
        "other: {<<: *kwargs, dtype: bfloat16}\n"
        "again: *targets\n"
        f"wide: [{', '.join(['x'] * (MAX_CONFIG_VALUES // 2))}]\n"
    )
    path = write(tmp_path, text)
    assert read_config_file(path) == yaml.safe_load(text)
    assert read_config_file(path)["other"] == {"dtype": "bfloat16", "attn_implementation": "eager"}


def test_a_config_file_larger_than_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("selection_method: sstoken\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ValueError, match=rf"big.yaml' is larger than {MAX_CONFIG_BYTES} bytes"):
        read_config_file(path)


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("selection_ratio: 0.5\nhistory: base\nselection_ratio: 0.9\n", "'selection_ratio'", 3, 1),
        ("env:\n  A: 1\n  A: 2\n", "'A'", 3, 2),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, text, key, line, first):
    """YAML (PyYAML) silently keeps the last of two equal keys: a run with another setting than the one read first."""
    path = write(tmp_path, text)
    assert yaml.safe_load(text)  # PyYAML alone accepts it
    with pytest.raises(ValueError, match=rf"run.yaml:{line}:\d+: not valid YAML: the key {key} is given twice "):
        read_config_file(path)
    with pytest.raises(ValueError, match=rf"first on line {first}"):
        read_config_file(path)


def test_the_cli_refuses_a_duplicate_key_before_loading_anything(tmp_path, capsys):
    config = write(tmp_path, "model_name_or_path: m\nuse_peft: true\nseed: 1\nseed: 2\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"--config {config}:4:1: not valid YAML: the key 'seed' is given twice (first on line 3)" in error


# ----- echoed values are bounded -----


def test_bounded_repr_is_repr_for_short_values_and_short_for_any_value():
    for value in ("old", 1.5, None, ["q_proj", "v_proj"], {"dtype": "float32"}, -1, "/a/b/c.jsonl"):
        assert bounded_repr(value) == repr(value)
    huge = ["lol"] * 9
    for _ in range(7):  # 9**8 items through shared references: repr() would build 40 MB of text
        huge = [huge] * 9
    assert len(bounded_repr(huge)) <= REPR_LIMIT
    assert bounded_repr(huge).startswith("[[[[")
    long_path = "/data/" + "x" * 10_000 + ".jsonl"
    shown = bounded_repr(long_path)
    assert len(shown) <= REPR_LIMIT and shown.startswith("'/data/xxx") and shown.endswith(".jsonl' (10012 characters)")
    assert bounded_text("y" * 10_000).endswith(f"... ({10_000 - TEXT_LIMIT} more characters cut)")
    assert bounded_text("short message") == "short message"


def test_a_long_value_makes_a_short_error(tmp_path, capsys):
    """At a smaller depth the alias bomb was an error message of 28 MB; any long value is now echoed in short."""
    with pytest.raises(ValueError) as error:
        SSTokenConfig(output_dir=str(tmp_path), selection_method="rel" * 100_000)
    assert "selection_method='relrelrel" in str(error.value) and len(str(error.value)) < 600
    with pytest.raises(ValueError) as error:
        SSTokenConfig(output_dir=str(tmp_path), history=[["base"] * 1000] * 1000)
    assert "history=[['base'" in str(error.value) and len(str(error.value)) < 600
    config = write(tmp_path, f"model_name_or_path: m\nuse_peft: true\nhistory: {'b' * 500_000}\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "history='bbbb" in error and "(500000 characters)" in error and len(error) < 1000


def test_long_paths_in_loading_and_trainer_checks_are_echoed_in_short():
    from trl_sstoken.data.inputs import check_history_device, check_reference_model
    from trl_sstoken.loading import UsageError, load_sft_datasets

    checks = [
        (UsageError, lambda: load_sft_datasets("./" + "d" * 100_000 + ".jsonl"), "--dataset_name './ddd"),
        (ValueError, lambda: check_reference_model("./" + "r" * 100_000), "reference_model='./rrr"),
        (ValueError, lambda: check_history_device("cuda:" + "7" * 100_000), "history_device='cuda:777"),
    ]
    for error_type, check, start in checks:
        with pytest.raises(error_type) as error:
            check()
        assert start in str(error.value) and len(str(error.value)) < 1000
