"""The seed data sets gptft carries, and downloading data files once into gptft's cache folder."""

from __future__ import annotations

import os
import shutil
import urllib.request
from importlib import resources
from pathlib import Path

from gptft.errors import GPTFTError
from gptft.io import atomic_path


def cache_dir() -> Path:
    """gptft's cache folder: ``$GPTFT_CACHE_DIR``, else ``~/.cache/gptft``."""
    return Path(os.environ.get("GPTFT_CACHE_DIR") or Path.home() / ".cache" / "gptft").expanduser()


def embedded_dir() -> Path:
    """Where gptft keeps its seed data sets (``gptft/assets/data``; sources and licences in
    ``gptft/assets/README.md``)."""
    return Path(str(resources.files("gptft").joinpath("assets", "data")))


def seed_file(name: str, urls: list[str], filename: str) -> Path:
    """The seed data set `name` carried inside gptft, or, where an installation lacks it, the
    file downloaded from `urls` into the cache as `filename` (``download``)."""
    path = embedded_dir() / name
    return path if path.is_file() else download(urls, filename)


def download(urls: list[str], filename: str, timeout: float = 60.0) -> Path:
    """Return ``cache_dir() / filename``, fetching it from the first URL that works if absent.

    The file is written under a temporary name and renamed, so an interrupted download never
    leaves a partial file behind. Call it under ``accelerator.main_process_first()`` so that only
    one process downloads.
    """
    dest = cache_dir() / filename
    if dest.is_file():
        return dest
    failures = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as r:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            return dest
        except OSError as e:  # URLError, HTTPError, timeouts are all OSErrors
            failures.append(f"{url}: {e}")
    raise GPTFTError(
        f"could not download {filename} into {dest.parent} ({'; '.join(failures)}). "
        f"Without network access, place the file at {dest} or pass its local path as data.path."
    )
