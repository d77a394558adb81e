"""gptft: fine-tune GPT-2 models as text classifiers and instruction followers."""

from gptft.classifier import load_classifier
from gptft.errors import GPTFTError
from gptft.model import GPT, GPTConfig, KVCache
from gptft.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "GPTFTError", "KVCache", "Tokenizer", "load_classifier", "__version__"]
