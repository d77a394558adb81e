import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A worktree elsewhere: set GPTFT_SHARED (or GPTFT_SHARED_DIR) to the shared folder.
SHARED = Path(os.environ.get("GPTFT_SHARED") or os.environ.get("GPTFT_SHARED_DIR") or ROOT.parent / "shared")

# One intra-op thread, in the test process and the jobs it starts (the same count in both: a run
# and its resumption in another process agree bit for bit only with the same reduction order). The
# tests' models are tiny, where a second thread buys nothing, and on a busy shared machine every
# parallel region waits for a descheduled thread (the quick subset at load average 10-12: 140 s
# with OMP_NUM_THREADS=1, 312 s with 2 threads). GPTFT_TEST_THREADS sets another count.
THREADS = os.environ.get("GPTFT_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS
torch.set_num_threads(int(THREADS))

# Subprocesses (launch/*.py, accelerate launch) import gptft from this checkout, not from wherever
# an editable install points (another worktree).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture
def tiny_config():
    from gptft import GPTConfig

    return GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


PACKAGED = ROOT / "gptft" / "assets" / "data"  # the same data files, as gptft carries them


def shared_path(*parts: str) -> Path:
    """A file under ../shared, else gptft's packaged copy of the same data file (byte-identical:
    gptft/assets/README.md), or skip the test when neither exists."""
    path = SHARED.joinpath(*parts)
    if not path.exists() and parts[0] == "data" and (PACKAGED / parts[-1]).is_file():
        return PACKAGED / parts[-1]
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"{path} not available")
    return path


def small_spam_data(folder: Path) -> Path:
    """30 ham and 30 spam messages of the real SMS collection, interleaved (split 42 / 6 / 12)."""
    lines = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv").read_text(
        encoding="utf-8").splitlines()
    ham = [x for x in lines if x.startswith("ham\t")][:30]
    spam = [x for x in lines if x.startswith("spam\t")][:30]
    path = folder / "sms.tsv"
    path.write_text("".join(f"{h}\n{s}\n" for h, s in zip(ham, spam)), encoding="utf-8")
    return path


def start_until_checkpoint(args: list[str], out: Path, env: dict[str, str]):
    """Start ``python launch/finetune.py ARGS`` and return its Popen once a first complete
    checkpoint is in ``out/checkpoints`` (stderr piped, for the caller to close)."""
    import subprocess
    import time

    from gptft.checkpoints import complete_checkpoints

    proc = subprocess.Popen([sys.executable, "launch/finetune.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(out / "checkpoints"):
        assert proc.poll() is None, f"the run ended before a checkpoint: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    return proc


def assert_only_known_run_files(folder: Path) -> None:
    """Every file a run wrote is one ``train.overwrite`` knows to remove (the files every run
    writes and those the tasks declare, gptft.runfolder), so an overwritten folder keeps nothing of
    the earlier run (W&B's own ``wandb/`` folder aside)."""
    from gptft.registry import declared_outputs
    from gptft.runfolder import ADAPTER_FILES, CORE_FILES, LOCK, MARKER, output_files

    known = {*CORE_FILES, *output_files(declared_outputs()), MARKER, LOCK}
    top = {p.name for p in folder.iterdir() if p.is_file()}
    assert top <= known, top - known
    if (folder / "adapter").is_dir():
        inside = {p.name for p in (folder / "adapter").iterdir()}
        assert inside <= set(ADAPTER_FILES), inside - set(ADAPTER_FILES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch_env() -> dict[str, str]:
    """The environment for ``accelerate launch --multi_gpu`` to start gloo processes on the CPU."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launcher(*args: str) -> list[str]:
    """``accelerate launch --multi_gpu ARGS launch/finetune.py`` (job arguments go after it)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *args,
            str(Path(__file__).resolve().parents[1] / "launch" / "finetune.py")]


# Keys whose values are wall-clock measurements: they differ between any two runs.
TIMING_KEYS = ("time", "generation_tokens_per_second")


def run_results(run: Path, name: str) -> list | dict:
    """A run's JSON file, ``metrics.json`` without its timings: what must be equal between
    equivalent runs (resumed or not, 1 or 2 processes)."""
    import json

    if name.endswith(".jsonl"):
        return [json.loads(line) for line in (run / name).read_text().splitlines()]
    data = json.loads((run / name).read_text())
    return {k: v for k, v in data.items() if k not in TIMING_KEYS} if isinstance(data, dict) else data


def tmpfs(folder: Path, size: str):
    """A tmpfs of `size` (``"4m"``) mounted on `folder` for a real ENOSPC, unmounted after (needs
    root and mount: the test is skipped elsewhere). A generator for fixtures to ``yield from``."""
    import shutil
    import subprocess

    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)
