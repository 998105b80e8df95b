"""`python -m trl_sstoken.cli`, e.g. under `accelerate launch -m trl_sstoken.cli train ...`."""

from . import entry_point


entry_point()
