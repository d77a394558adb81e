"""Export a language-model run (e.g. instruction tuning) as a Hugging Face GPT-2 folder.

``export_run`` (the ``gptft export`` command): the run's final weights (for a LoRA run, the
adapters are already merged into them) are written as
``config.json`` + ``model.safetensors`` that ``transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)``
loads. No tokenizer files are written: gptft's text goes through tiktoken's GPT-2 BPE, GPT-2's own
tokenizer (``transformers.AutoTokenizer.from_pretrained("gpt2")``).

The folder is built beside OUT_DIR under a temporary name and renamed into place at the end, so a
failure never leaves a half-written folder, nor harms one already there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gptft.errors import GPTFTError
from gptft.io import make_folder, usual_mode, writing


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the GPT of the language-model run `run_dir` as a Hugging Face GPT-2 folder `out_dir`.

    Raises:
        GPTFTError: if `run_dir` is not a finished language-model run, or `out_dir` is a file, is (or
            holds) the run folder, or is a non-empty folder and `overwrite` is false.
    """
    from gptft.runs import load_gpt, load_meta

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    from gptft.tasks import TASKS

    meta = load_meta(run_dir)
    spec = TASKS.get(meta.get("task"))
    if spec is None or spec.produces != "lm":
        lm = ", ".join(s.name for s in TASKS.values() if s.produces == "lm")
        raise GPTFTError(f"{run_dir}: a {meta.get('task')} run; export writes GPT-2 language-model "
                         f"folders from {lm} runs only. Use a classifier run with "
                         "`gptft classify` or gptft.load_classifier")
    _check_target(run_dir, out_dir, overwrite)
    model, _ = load_gpt(run_dir)
    target = out_dir.resolve()
    make_folder(target.parent)  # a path under a file, no permission: one line
    with writing(out_dir, "export"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, usual_mode(folder=True))  # mkdtemp makes it owner-only
    try:
        with writing(out_dir, "export"):  # disk full: one line, OUT_DIR as it was
            model.save_pretrained(tmp)
            _replace_dir(tmp, target)
    except GPTFTError as e:  # a file of the temporary folder: name OUT_DIR instead
        if not hasattr(e, "reason"):
            raise
        raise GPTFTError(f"{out_dir}: cannot write the export: {e.reason}; nothing was "
                         "replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


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
