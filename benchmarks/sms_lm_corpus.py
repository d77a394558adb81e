"""Write unlabelled SMS texts as instruction records, for training a small base language model.

Every message of the SMS collection except the texts of the classification job's validation and
test splits (no labels, no evaluation text), each as the response to "Write a text message.".
docs/lora.md trains a base on it with ``configs/instruct-tiny.yaml`` (``data.mask_prompt=true``)
as a stand-in for pretrained GPT-2 when comparing LoRA with full fine-tuning.

    python benchmarks/sms_lm_corpus.py sms-lm.json [--config configs/spam-tiny.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from gptft.config import load_job
from gptft.data.classification import load_classification_data


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--config", default="configs/spam-tiny.yaml", help="the classification job")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the job, e.g. data.path=...")
    args = parser.parse_intermixed_args(argv)
    job = load_job(args.config, args.overrides)
    splits = load_classification_data(job.data)
    held_out = set(splits.val.texts) | set(splits.test.texts)
    with open(job.data.path, encoding="utf-8") as f:
        texts = [line.split("\t", 1)[1] for line in f.read().splitlines() if "\t" in line]
    keep = [t for t in texts if t.strip() and t not in held_out]
    records = [{"instruction": "Write a text message.", "input": "", "output": t} for t in keep]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(records, f)
    print(f"{len(texts)} messages, {len(held_out)} held-out texts, {len(keep)} written to {args.out}")
    return records


if __name__ == "__main__":
    main()
