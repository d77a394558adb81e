"""Finding checkpoints: local Hugging Face folders or Hugging Face hub repos (any ``org/name``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gptft.errors import GPTFTError
from gptft.io import read_json_object

HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HINT = ("pass a local folder holding config.json and model.safetensors instead "
        "(model.checkpoint=DIR, or from_pretrained('DIR'))")
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
"""What is downloaded of a hub repo: the config, the safetensors weights, the tokenizer files."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder for `name_or_path`: a folder as it is, a GPT-2 name or any hub repo
    id ``org/name`` downloaded into the Hugging Face cache (its config, weights and tokenizer
    files), or found there when ``HF_HUB_OFFLINE`` is set."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    repo = HUB_REPOS.get(name) or (name if _REPO_ID.fullmatch(name) else None)
    if repo is None:
        raise GPTFTError(
            f"{name!r} is not a folder and not a known model "
            f"({', '.join(HUB_REPOS)}, or a hub repo id such as Qwen/Qwen3-0.6B); {HINT}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    try:
        folder = snapshot_download(repo, allow_patterns=HUB_FILES)
    except Exception as e:  # network, offline mode, missing cache, auth: all end the same way
        where = "HF_HUB_OFFLINE is set and it is not in" if HF_HUB_OFFLINE else "tried"
        raise GPTFTError(
            f"could not get model {name!r} (hub repo {repo}; {where} the cache {HF_HUB_CACHE}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; {HINT}; or train "
            "from scratch without pretrained weights: model.weights=random (the configs/*-tiny.yaml "
            "jobs run offline on a CPU)"
        ) from None
    return Path(folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (single file or sharded)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return _shards(folder, index)
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise GPTFTError(
            f"{folder}: only pickle weights (*.bin / *.pt) found; gptft reads safetensors only. "
            "Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    raise GPTFTError(f"{folder}: no model.safetensors; {HINT}")


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files an index names, each checked to be a file inside `folder` (an index naming
    ``../x`` or ``/etc/x`` is refused, not followed)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise GPTFTError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
    root = folder.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (folder / name).resolve()
        if Path(name).is_absolute() or root not in shard.parents:
            raise GPTFTError(f"{index}: shard {name!r} is outside the checkpoint folder {folder}; "
                             "an index may only name files inside it")
        shards.append(folder / name)
    return shards
