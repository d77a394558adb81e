"""gptft: fine-tune GPT-2 models as text classifiers and instruction followers.

``import gptft`` is light (no torch): the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gptft.errors import GPTFTError

__version__ = "0.1.0"

_LAZY = {
    "GPT": "gptft.model",
    "GPTConfig": "gptft.model",
    "KVCache": "gptft.model",
    "Tokenizer": "gptft.tokenizer",
    "load_classifier": "gptft.classifier",
}
__all__ = ["GPTFTError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and editors: the names as if imported
    from gptft.classifier import load_classifier  # noqa: F401
    from gptft.model import GPT, GPTConfig, KVCache  # noqa: F401
    from gptft.tokenizer import Tokenizer  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptft' has no attribute {name!r}")
