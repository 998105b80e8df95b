"""What a resume must match: the settings a checkpoint's marker records and a resume compares.

A checkpoint continues one run. Resuming it with settings that change what is selected, which data is trained on and
in which order, or what the optimizer and scheduler states mean would continue another experiment from this one's
state, often silently (a new learning rate is ignored: the optimizer and scheduler states come from the checkpoint).
`checkpoint_settings(args)` are those settings, read off the configuration: every `SSTokenConfig` field whose
metadata says `"resume": "must_match"` (or `"must_match_whether_set"`: only whether it is set), the inherited fields
of `config.SFT_RESUME_MUST_MATCH`, and the examples per optimizer step (`total_train_batch_size`). Nothing here
keeps its own list of fields.
"""

import json

from .. import config


TOTAL_BATCH = "total_train_batch_size"


def checkpoint_settings(args) -> dict:
    """The settings of a run that a resume must match, as recorded in (and compared with) a checkpoint's marker."""
    settings = {}
    for field in config.sstoken_fields():
        rule = config.resume_rule(field)
        if rule == config.RESUME_MUST_MATCH:
            settings[field.name] = getattr(args, field.name)
        elif rule == config.RESUME_WHETHER_SET:
            settings[f"{field.name} set"] = getattr(args, field.name) is not None
    for name in config.SFT_RESUME_MUST_MATCH:
        settings[name] = getattr(args, name)
    settings[TOTAL_BATCH] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {name: stored_form(value) for name, value in settings.items()}


def stored_form(value):
    """`value` as the marker's JSON gives it back (enums as their strings, tuples as lists, a `datasets.Dataset` as
    its description), so that a recorded and a current value compare equal exactly when they are the same."""
    return json.loads(json.dumps(value, default=str))
