"""Load a tokenizer, a model and a dataset by hub id or local path, the way `trl-sstoken` does.

Used by the console script (`cli/`), the examples and the Colab notebook, so that a local folder or file behaves
exactly like a hub id everywhere. Every error names the flag (as the CLI spells it) and what is allowed.
"""

import json
import os

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .bounded import bounded_repr, bounded_text


LOCAL_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Tokenizers saved from a bare `tokenizers.Tokenizer` record one of these generic classes
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class UsageError(ValueError):
    """A bad flag value or input: the message says which flag, what was given and what is allowed."""


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved at a hub id or local folder, built as the class it was saved as.

    `AutoTokenizer` picks the tokenizer class from the model's `config.json` when one sits next to the tokenizer;
    for a generic tokenizer (saved from a `tokenizers.Tokenizer`, `tokenizer_class` "TokenizersBackend" or
    "PreTrainedTokenizerFast") next to, say, a qwen2 config it then builds a Qwen2 tokenizer around a different
    vocabulary and tokenizes garbage. Such tokenizers are loaded with `PreTrainedTokenizerFast` instead.
    """
    saved_class = _saved_tokenizer_class(name_or_path, revision)
    try:
        if saved_class in GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(name_or_path, revision=revision)
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UsageError(
            f"No tokenizer could be loaded from {bounded_repr(name_or_path)} (--tokenizer_name_or_path, which "
            f"defaults to --model_name_or_path): {bounded_text(error, 500)}. Pass a hub id or a local folder that "
            "holds tokenizer files."
        ) from error


def _saved_tokenizer_class(name_or_path: str, revision: str | None) -> str | None:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "tokenizer_config.json")
    else:
        from transformers.utils import cached_file

        try:
            path = cached_file(
                name_or_path,
                "tokenizer_config.json",
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            path = None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file).get("tokenizer_class")


def load_sft_datasets(
    dataset_name: str | None,
    dataset_config: str | None = None,
    train_split: str = "train",
    streaming: bool = False,
    mixture=None,
) -> DatasetDict | IterableDatasetDict:
    """The dataset named by `--dataset_name` (or the `datasets:` mixture of the YAML config), as a dict of splits.

    `dataset_name` may be a hub id, a local .json/.jsonl/.csv/.parquet file (loaded as the split `train_split`), a
    folder written by `Dataset.save_to_disk`, or a folder of data files. `mixture` is TRL's `DatasetMixtureConfig`;
    when it lists datasets it wins, as in `trl sft`.
    """
    if mixture is not None and mixture.datasets:
        from trl import get_dataset

        return get_dataset(mixture)
    if not dataset_name:
        raise UsageError(
            "No dataset given. Pass --dataset_name (a hub id, a local .json, .jsonl, .csv or .parquet file, or a "
            "folder), or list `datasets:` in the --config YAML."
        )
    if os.path.isfile(dataset_name):
        extension = _data_extension(dataset_name)
        if extension not in LOCAL_DATA_FORMATS:
            raise UsageError(
                f"--dataset_name {bounded_repr(dataset_name)} is a file of an unsupported type "
                f"{bounded_repr(extension or '(none)')}; allowed file types: {', '.join(LOCAL_DATA_FORMATS)}."
            )
        return _load_local(
            dataset_name, LOCAL_DATA_FORMATS[extension], data_files={train_split: dataset_name}, streaming=streaming
        )
    if os.path.isdir(dataset_name):
        model_files = _model_files_in(dataset_name)
        if model_files:
            raise UsageError(
                f"--dataset_name {bounded_repr(dataset_name)} is a saved model, not a dataset (it holds "
                f"{', '.join(model_files)}). Pass the model as --model_name_or_path, and as --dataset_name a hub "
                f"dataset id, a {', '.join(LOCAL_DATA_FORMATS)} file, or a folder of data files."
            )
        if any(os.path.exists(os.path.join(dataset_name, name)) for name in ("dataset_dict.json", "state.json")):
            loaded = load_from_disk(dataset_name)
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({train_split: loaded})
        return _load_local(dataset_name, dataset_name, name=dataset_config, streaming=streaming)
    if looks_like_a_path(dataset_name):
        raise UsageError(
            f"--dataset_name {bounded_repr(dataset_name)} looks like a local path, but no such file or folder "
            f"exists. Pass an existing {', '.join(LOCAL_DATA_FORMATS)} file, a folder, or a hub id such as "
            "'trl-lib/Capybara'."
        )
    return load_dataset(dataset_name, name=dataset_config, streaming=streaming)


# A folder with one of these and weights or tokenizer files is a saved model (or adapter), not data: `load_dataset`
# read its JSON files as rows and failed with a raw DatasetGenerationError
MODEL_CONFIG_FILES = ("config.json", "adapter_config.json")
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _model_files_in(folder: str) -> list[str]:
    """The files that show `folder` to be a saved model or adapter (a config and weights or a tokenizer), or []."""
    names = set(os.listdir(folder))
    configs = [name for name in MODEL_CONFIG_FILES if name in names]
    others = sorted(name for name in names if name.endswith(MODEL_FILE_SUFFIXES) or name in TOKENIZER_FILES)
    return configs + others[:2] if configs and others else []


def _load_local(dataset_name: str, *args, **kwargs):
    """`load_dataset` of a local file or folder, with what could not be read as an error naming --dataset_name
    (datasets raises a DatasetGenerationError that says only "An error occurred while generating the dataset")."""
    try:
        return load_dataset(*args, **kwargs)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise UsageError(
            f"--dataset_name {bounded_repr(dataset_name)} could not be read as a dataset: "
            f"{bounded_text(f'{type(cause).__name__}: {cause}', 500)}. Check the file's format, or pass a hub "
            f"dataset id, a {', '.join(LOCAL_DATA_FORMATS)} file, or a folder of data files."
        ) from error
    except FileNotFoundError as error:  # datasets' EmptyDatasetError, DataFilesNotFoundError: no data files there
        raise UsageError(
            f"--dataset_name {bounded_repr(dataset_name)}: {bounded_text(error, 500)}. A folder must hold "
            f"{', '.join(LOCAL_DATA_FORMATS)} files (or be written by Dataset.save_to_disk)."
        ) from error


def pick_split(datasets, split: str, flag: str) -> Dataset | IterableDataset:
    """`datasets[split]`, or an error naming `flag` and the splits there are."""
    if split not in datasets:
        raise UsageError(
            f"{flag} {bounded_repr(split)} is not a split of the dataset; its splits are: {', '.join(datasets)}."
        )
    return datasets[split]


def _data_extension(path: str) -> str:
    name = path.lower()
    for compressed in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    return os.path.splitext(name)[1]


def looks_like_a_path(name: str) -> bool:
    """True for names a hub id cannot be: relative or absolute paths, more than one '/', a data file's extension."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or _data_extension(name) in LOCAL_DATA_FORMATS
    )
