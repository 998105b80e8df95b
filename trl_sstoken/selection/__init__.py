"""Token selection, one training step's pure tensor work: where prompts and responses lie in a batch
(`regions.py`), the scores and the top-k per sequence (`scoring.py`), one class per selection method and the
method registry (`methods.py`), the loss over the kept tokens (`loss.py`), and what is logged about them
(`metrics.py`)."""
