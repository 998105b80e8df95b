"""What a model card names: the base model and the dataset, as hub links only when they are hub ids.

TRL's card template links `https://huggingface.co/{base_model}` and `.../datasets/{dataset_name}` whatever they
are, and writes `None` where a name is missing: "Model Card for None" without `model_name`, "a fine-tuned version of
[None](https://huggingface.co/None)" for a model loaded from a local folder, `model="None"` in the quick start
without a hub id. `card_names` works out the names; `name_base_model_and_dataset` rewrites those two lines of the
rendered card.
"""

import os
import re
from dataclasses import dataclass

from .loading import looks_like_a_path


@dataclass(frozen=True)
class CardNames:
    model_name: str  # the card's title: the given name, else the output folder's name
    base_model: str  # a hub id, a local path, or "" for a model built in memory
    base_is_hub: bool
    dataset: str | None  # a hub id, a local path, or None when not known
    dataset_is_hub: bool
    usage_id: str  # what the quick start loads: the hub id pushed to, else the output folder

    @property
    def hub_dataset(self) -> str | None:
        """The dataset name to give TRL, which links whatever it gets to the hub."""
        return self.dataset if self.dataset_is_hub else None


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and not looks_like_a_path(name)


def card_names(trainer, model_name: str | None = None, dataset_name: str | None = None) -> CardNames:
    output_dir = trainer.args.output_dir
    base_model = str(getattr(trainer.model.config, "_name_or_path", "") or "")
    return CardNames(
        model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
        base_model=base_model,
        base_is_hub=is_hub_id(base_model),
        dataset=dataset_name,
        dataset_is_hub=is_hub_id(dataset_name),
        usage_id=trainer.hub_model_id or output_dir,
    )


def name_base_model_and_dataset(card: str, names: CardNames) -> str:
    """The card with its "fine-tuned version of" sentence and its quick-start model id stated from `names`."""
    if names.base_is_hub:
        base = f"[{names.base_model}](https://huggingface.co/{names.base_model})"
    elif names.base_model:
        base = f"`{names.base_model}` (a local folder)"
    else:
        base = "a model built in memory (it has no hub id or path)"
    if names.dataset is None:
        dataset = ""
    elif names.dataset_is_hub:
        dataset = f" on the [{names.dataset}](https://huggingface.co/datasets/{names.dataset}) dataset"
    else:
        dataset = f" on the local dataset `{names.dataset}`"
    sentence = f"This model is a fine-tuned version of {base}{dataset}."
    card = re.sub(r"^This model is a fine-tuned version of .*$", lambda _: sentence, card, count=1, flags=re.M)
    return card.replace('model="None"', f'model="{names.usage_id}"')
