"""Export a run as a Hugging Face ``transformers`` folder: ``gptft export RUN_DIR OUT_DIR``.

A language-model run (instruction tuning, preference tuning) becomes a ``GPT2LMHeadModel`` folder,
a classification run a ``GPT2ForSequenceClassification`` folder (``id2label``, ``label2id``,
``pad_token_id``; its head is ``score``, which has no bias: the head's bias is folded into the
final LayerNorm's, see ``gptft.lora.fold_head_bias``, so the logits are gptft's). For a LoRA run
the adapters are already merged into the weights. Every folder also holds:

- GPT-2's tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) written from the BPE files gptft carries, so
  ``transformers.AutoTokenizer.from_pretrained(OUT_DIR)`` works offline;
- ``generation_config.json``: the end-of-text token and the run's ``generate`` settings
  (language models);
- ``prompt_style.json``: the prompt template the model was tuned with (instruction and
  preference runs).

The folder is built beside OUT_DIR under a temporary name and renamed into place at the end, so a
failure never leaves a half-written folder, nor harms one already there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptft.errors import GPTFTError
from gptft.io import make_folder, usual_mode, write_json, writing
from gptft.runfolder import CONFIG

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model of the finished run `run_dir` as a ``transformers`` folder `out_dir`.

    Raises:
        GPTFTError: if `run_dir` is not a finished run, or `out_dir` is a file, is (or holds) the
            run folder, or is a non-empty folder and `overwrite` is false.
    """
    from gptft.runs import load_meta, run_produces

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    meta = load_meta(run_dir)
    produces = run_produces(meta)
    if produces not in ("lm", "classifier"):
        raise GPTFTError(f"{run_dir}: gptft.json names neither what the run produces nor a known "
                         f"task (task {meta.get('task')!r}, produces {meta.get('produces')!r})")
    _check_target(run_dir, out_dir, overwrite)
    target = out_dir.resolve()
    make_folder(target.parent)  # a path under a file, no permission: one line
    with writing(out_dir, "export"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, usual_mode(folder=True))  # mkdtemp makes it owner-only
    try:
        with writing(out_dir, "export"):  # disk full: one line, OUT_DIR as it was
            if produces == "classifier":
                max_length = _write_classifier(run_dir, tmp)
            else:
                max_length = _write_lm(run_dir, tmp, meta)
            write_tokenizer_files(tmp, max_length, meta.get("tokenizer", "gpt2"))
            _replace_dir(tmp, target)
    except GPTFTError as e:  # a file of the temporary folder: name OUT_DIR instead
        if not hasattr(e, "reason"):
            raise
        raise GPTFTError(f"{out_dir}: cannot write the export: {e.reason}; nothing was "
                         "replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_lm(run_dir: Path, folder: Path, meta: dict) -> int:
    from gptft.prompts import get_style
    from gptft.runs import load_gpt

    model, _ = load_gpt(run_dir)
    model.save_pretrained(folder)
    write_json(folder / "generation_config.json", generation_config(run_dir, model.config))
    if meta.get("prompt_style"):
        style = asdict(get_style(meta["prompt_style"]))
        write_json(folder / "prompt_style.json", {
            **style, "how": "prompt = template (+ input_template when the record has an input) "
                           "+ response_header, with {instruction} and {input} filled in; the "
                           "response follows and ends with <|endoftext|>"})
    return model.config.context_length


def _write_classifier(run_dir: Path, folder: Path) -> int:
    from gptft.classifier import load_classifier
    from gptft.io import save_safetensors
    from gptft.lora import fold_head_bias

    clf = load_classifier(run_dir)
    gpt, head = clf.model.backbone, clf.model.head
    state = gpt.hf_state_dict()
    state["score.weight"] = head.weight.detach()
    state["transformer.ln_f.bias"] = fold_head_bias(gpt.ln_f.bias.detach(), head.weight.detach(),
                                                    head.bias.detach())
    save_safetensors(state, folder / "model.safetensors")  # Hugging Face's name
    eot = clf.tokenizer.eot_id
    write_json(folder / "config.json", {
        **gpt.config.to_hf_config(), "architectures": ["GPT2ForSequenceClassification"],
        "id2label": dict(enumerate(clf.labels)), "label2id": {n: i for i, n in enumerate(clf.labels)},
        "pad_token_id": eot, "problem_type": "single_label_classification"})
    return clf.max_length


def generation_config(run_dir: Path, config) -> dict[str, Any]:
    """``generation_config.json``: GPT-2's end-of-text token and the run's ``generate`` settings
    (from its ``config.yaml``; gptft's defaults when it has none)."""
    import yaml

    from gptft.config import GenerateConfig
    from gptft.model import GPT2_EOT_ID

    path = run_dir / CONFIG
    saved = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    gen = GenerateConfig(**(saved.get("generate") or {}))
    out: dict[str, Any] = {"bos_token_id": GPT2_EOT_ID, "eos_token_id": GPT2_EOT_ID,
                           "pad_token_id": GPT2_EOT_ID, "max_new_tokens": gen.max_new_tokens,
                           "do_sample": gen.temperature > 0}
    if gen.temperature > 0:  # greedy otherwise: sampling settings would only draw warnings
        out.update(temperature=gen.temperature, top_k=gen.top_k or 0, top_p=gen.top_p or 1.0)
    return out


def write_tokenizer_files(folder: Path, max_length: int, name: str = "gpt2") -> None:
    """GPT-2's tokenizer as ``transformers`` reads it, from the BPE files gptft carries
    (``vocab.json`` is GPT-2's ``encoder.json``, ``merges.txt`` its ``vocab.bpe``)."""
    from gptft.tokenizer import bpe_file

    if name != "gpt2":
        raise GPTFTError(f"tokenizer {name!r}: gptft exports GPT-2's tokenizer only")
    (folder / "vocab.json").write_bytes(bpe_file("encoder.json"))  # inside the temporary folder
    (folder / "merges.txt").write_bytes(bpe_file("vocab.bpe"))
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
               "pad_token": ENDOFTEXT}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
        "add_prefix_space": False, "add_bos_token": False, "errors": "replace", **special})


def _check_target(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GPTFTError(f"{out_dir}: exists and is not a folder")
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or out in run.parents:
        raise GPTFTError(f"{out_dir}: would replace the run folder {run_dir}; choose another folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GPTFTError(f"{out_dir}: folder exists and is not empty (--overwrite replaces it)")


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:  # put the previous folder back
            os.replace(old / target.name, target)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
