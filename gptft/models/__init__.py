"""Model families: one registry from a Hugging Face ``model_type`` to gptft's model of it.

(Integration shim: GPT-2 only until the family decoder lands.)
"""

from __future__ import annotations

import os

import torch.nn as nn

from gptft.errors import GPTFTError


def is_gpt2_name(name: str) -> bool:
    from gptft.hub import HUB_REPOS
    from gptft.model import PRESETS

    return name in PRESETS or name in HUB_REPOS or name in HUB_REPOS.values()


def hub_repo(name: str) -> str:
    """The hub repo id of a preset name (a repo id stays as it is)."""
    from gptft.hub import HUB_REPOS

    return HUB_REPOS.get(name, name)


def config_from_dict(architecture: str, d: dict, source: str = "gptft.json"):
    from gptft.model import GPTConfig

    if architecture != "gpt2":
        raise GPTFTError(f"{source}: unknown architecture {architecture!r}")
    import dataclasses

    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if set(d) - known:
        raise GPTFTError(f"{source}: model: unknown key(s) {', '.join(sorted(set(d) - known))}")
    try:
        return GPTConfig(**d)
    except GPTFTError as e:
        raise GPTFTError(f"{source}: {e}") from None


def preset_config(name: str, **overrides):
    from gptft.model import GPTConfig

    return GPTConfig.from_name(name, **overrides)


def build_model(config) -> nn.Module:
    from gptft.model import GPT

    return GPT(config)


def from_pretrained(name_or_path: str | os.PathLike, device=None, **overrides) -> nn.Module:
    from gptft.model import GPT

    return GPT.from_pretrained(name_or_path, device=device, **overrides)
