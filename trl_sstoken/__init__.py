"""ssToken token selection for TRL's SFTTrainer.

The public names are imported on first use (PEP 562), so that `import trl_sstoken.cli` alone imports neither torch
nor TRL: the console script sets its warning filters first (`cli.quiet_third_party_warnings`), and
`trl-sstoken --help` answers at once.
"""

import importlib
from typing import TYPE_CHECKING


__all__ = ["SSTokenConfig", "SSTokenTrainer", "TrainingDivergedError", "select_tokens"]
__version__ = "0.1.0"

_MODULE_OF = {
    "SSTokenConfig": ".config",
    "SSTokenTrainer": ".trainer",
    "TrainingDivergedError": ".divergence",
    "select_tokens": ".selection.scoring",
}

if TYPE_CHECKING:
    from .config import SSTokenConfig
    from .divergence import TrainingDivergedError
    from .selection.scoring import select_tokens
    from .trainer import SSTokenTrainer


def __getattr__(name):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
