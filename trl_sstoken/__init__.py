"""ssToken token selection for TRL's SFTTrainer."""

from .config import SSTokenConfig
from .scoring import select_tokens
from .trainer import SSTokenTrainer


__all__ = ["SSTokenConfig", "SSTokenTrainer", "select_tokens"]
__version__ = "0.1.0"
