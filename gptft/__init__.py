"""gptft: fine-tune GPT-2 models as text classifiers and instruction followers."""

from gptft.errors import GPTFTError
from gptft.model import GPT, GPTConfig, KVCache
from gptft.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "GPTFTError", "KVCache", "Tokenizer", "__version__"]
