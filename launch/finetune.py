"""Fine-tune GPT-2: ``accelerate launch launch/finetune.py --config configs/spam.yaml [key=value ...]``.

Also runs as plain ``python launch/finetune.py ...`` (one process). All logic lives in gptft.
"""

import sys

from gptft.cli import run

if __name__ == "__main__":
    run(["finetune", *sys.argv[1:]])
