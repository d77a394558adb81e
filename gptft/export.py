"""Export a run as a Hugging Face ``transformers`` folder: ``gptft export RUN_DIR OUT_DIR``.

A language-model run (instruction tuning, preference tuning) becomes a folder of its family's
causal LM (``GPT2LMHeadModel``, ``Qwen3ForCausalLM``, ``LlamaForCausalLM``, ...), a classification
run one of its ``*ForSequenceClassification`` (``id2label``, ``label2id``, ``pad_token_id``; its
head is ``score``, which has no bias: GPT-2's head bias is folded into the final LayerNorm's, see
``gptft.lora.fold_head_bias``, and the other families' heads have none, so the logits are
gptft's). For a LoRA run the adapters are already merged into the weights. Every folder also holds:

- the tokenizer, so ``transformers.AutoTokenizer.from_pretrained(OUT_DIR)`` works offline:
  GPT-2's files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) written from the BPE files gptft carries, or the run's own
  ``tokenizer.json`` and ``tokenizer_config.json`` (with its chat template);
- ``generation_config.json``: the end-of-sequence tokens and the run's ``generate`` settings
  (language models);
- ``prompt_style.json``: the prompt template the model was tuned with (instruction and
  preference runs).

The folder is built beside OUT_DIR under a temporary name and renamed into place at the end, so a
failure never leaves a half-written folder, nor harms one already there. Every export holds a marker,
``.gptft-export`` (the run it came from): ``--overwrite`` replaces only a folder holding one, never
a folder gptft export did not write (a thesis folder, a run folder), nor a symbolic link.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptft.errors import GPTFTError
from gptft.io import make_folder, read_json_object, usual_mode, write_json, writing

ENDOFTEXT = "<|endoftext|>"
MARKER = ".gptft-export"
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
            _write_run_tokenizer(run_dir, meta, tmp, max_length)
            if isinstance(meta.get("chat_template"), str):  # the template the run was trained with
                config = read_json_object(tmp / "tokenizer_config.json")
                write_json(tmp / "tokenizer_config.json", {**config, "chat_template": meta["chat_template"]})
            _write_marker(tmp, run_dir)
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
    from gptft.runs import load_gpt, run_tokenizer

    model, _ = load_gpt(run_dir)
    model.save_pretrained(folder)
    tokenizer = run_tokenizer(run_dir, meta)
    _set_special_ids(folder / "config.json", tokenizer)
    write_json(folder / "generation_config.json", generation_config(run_dir, model.config, tokenizer))
    if meta.get("prompt_style") and not meta.get("chat_template"):  # a text style, not a template
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
    body, head = clf.model.backbone, clf.model.head
    state = {k: v for k, v in body.hf_state_dict().items() if k != "lm_head.weight"}
    state["score.weight"] = head.weight.detach()
    if body.architecture == "gpt2":
        state["transformer.ln_f.bias"] = fold_head_bias(body.ln_f.bias.detach(), head.weight.detach(),
                                                        head.bias.detach())
        config = {**body.config.to_hf_config(), "architectures": ["GPT2ForSequenceClassification"]}
    else:
        from gptft.models.families import to_hf_config

        config = to_hf_config(body.config, classifier=True)
    save_safetensors(state, folder / "model.safetensors")  # Hugging Face's name
    write_json(folder / "config.json", {
        **config, "id2label": dict(enumerate(clf.labels)),
        "label2id": {n: i for i, n in enumerate(clf.labels)},
        "pad_token_id": clf.tokenizer.pad_id, "problem_type": "single_label_classification"})
    if body.architecture != "gpt2":
        _set_special_ids(folder / "config.json", clf.tokenizer)
    return clf.max_length


def _special_ids(tokenizer) -> dict[str, Any]:
    """bos / eos / pad ids as ``transformers`` configs hold them (several stop ids: a list)."""
    stops = list(dict.fromkeys([tokenizer.eos_id, *getattr(tokenizer, "stop_ids", [])]))
    bos = getattr(tokenizer, "bos_id", None)
    return {"bos_token_id": tokenizer.eos_id if bos is None else bos,
            "eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": tokenizer.pad_id}


def _set_special_ids(path: Path, tokenizer) -> None:
    """Make a written ``config.json`` name the run's tokenizer's special ids (a model initialised
    from a preset carries the preset's, which another tokenizer does not have)."""
    from gptft.io import read_json

    write_json(path, {**read_json(path), **_special_ids(tokenizer)})


def generation_config(run_dir: Path, config, tokenizer=None) -> dict[str, Any]:
    """``generation_config.json``: the tokenizer's end-of-sequence ids (GPT-2's end-of-text when
    none is given) and the run's ``generate`` settings (from its ``config.yaml``; gptft's defaults
    when it has none)."""
    from gptft.runs import saved_generate_config
    from gptft.tokenizer import load_tokenizer

    gen = saved_generate_config(run_dir)
    out: dict[str, Any] = {**_special_ids(tokenizer or load_tokenizer("gpt2")),
                           "max_new_tokens": gen.max_new_tokens, "do_sample": gen.temperature > 0}
    if gen.temperature > 0:  # greedy otherwise: sampling settings would only draw warnings
        out.update(temperature=gen.temperature, top_k=gen.top_k or 0, top_p=gen.top_p or 1.0)
    return out


def _write_run_tokenizer(run_dir: Path, meta: dict, folder: Path, max_length: int) -> None:
    """The run's tokenizer into the export: its own files (a Hugging Face tokenizer), or GPT-2's."""
    from gptft.runs import TOKENIZER_DIR

    own = run_dir / TOKENIZER_DIR
    if not own.is_dir():
        write_tokenizer_files(folder, max_length, meta.get("tokenizer", "gpt2"))
        return
    for file in sorted(own.iterdir()):
        if file.is_file() and not file.is_symlink():
            (folder / file.name).write_bytes(file.read_bytes())  # inside the temporary folder
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        from gptft.io import read_json

        write_json(config_path, {**read_json(config_path), "model_max_length": max_length})


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


def _write_marker(folder: Path, run_dir: Path) -> None:
    """``.gptft-export``: this folder is gptft export's (``--overwrite`` may replace it)."""
    from gptft import __version__

    write_json(folder / MARKER, {"gptft": __version__, "run": str(run_dir.resolve())})


def _check_target(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    from gptft.runfolder import MARKER as RUN_MARKER

    if out_dir.is_symlink():
        raise GPTFTError(f"{out_dir}: is a symbolic link; gptft export writes a folder of its own "
                         "there, never through a link: name the folder itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise GPTFTError(f"{out_dir}: exists and is not a folder")
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or out in run.parents:
        raise GPTFTError(f"{out_dir}: would replace the run folder {run_dir}; choose another folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise GPTFTError(f"{out_dir}: folder exists and is not empty (--overwrite replaces an "
                         "earlier export)")
    if (out_dir / RUN_MARKER).exists():
        raise GPTFTError(f"{out_dir}: is a gptft run folder, not an export; --overwrite replaces "
                         "only an earlier export: choose another folder")
    if not (out_dir / MARKER).is_file() or (out_dir / MARKER).is_symlink():
        raise GPTFTError(f"{out_dir}: not an earlier gptft export (no {MARKER} in it); --overwrite "
                         "replaces only a folder gptft export wrote: choose another folder")


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and deleted after.
    Nothing of the move is left behind when it fails (the previous folder is put back)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        try:
            os.replace(target, old / target.name)
        except OSError:
            old.rmdir()
            raise
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:  # put the previous folder back
            os.replace(old / target.name, target)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
