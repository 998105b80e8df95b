"""Saving and resuming a run: the crash-safe checkpoint protocol and resume checks (`checkpoints.py`), the bodies of
the trainer's save/load overrides (`trainer_hooks.py`), and the model card (`model_card.py`)."""
