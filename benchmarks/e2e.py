"""Whole-job benchmark: fine-tuning jobs through gptft's real entry point, timed end to end.

Each ``--repo`` (a checkout of gptft; default: this one) runs the job as
``python REPO/launch/finetune.py --config CONFIG [SET ...] output_dir=TMP`` in a fresh process
with ``PYTHONPATH=REPO``; ``--textbook`` adds the textbook's own end-to-end spam job (chapter 6
of *Build a Large Language Model (From Scratch)*: its ``SpamDataset`` padding every example to the
longest training example, ``train_classifier_simple`` with ``eval_freq=50, eval_iter=5``, then
the accuracy on each whole split, and ``torch.save`` of the model) on the same data and device,
also in a fresh process. Repeats are interleaved (A, B, textbook, A, B, textbook, ...).

Measured from outside every process: the wall time from its start to its exit, and the phases:

* ``startup``: process start to the training loop (imports, data, tokenization, model build);
* ``first_step``: the first optimizer step;
* ``steps``: the other training steps;
* ``between_steps``: evaluations and checkpoints inside the training loop;
* ``final``: after the loop (final evaluation of every split, saving, plots);
* ``exit``: from the job's last line of output to the process's exit.

For gptft they come from its training progress bar, printed at every step
(``TQDM_MININTERVAL=0 TQDM_MINITERS=1``) and timestamped as it arrives, with ``log.jsonl`` saying
after which steps the trainer evaluated (the step after an evaluation is counted at the median
step time, the rest of its interval as ``between_steps``). The textbook's process reports its own
time stamps (its optimizer steps through a step hook, its evaluations by wrapping the book's
``evaluate_model`` and ``calc_accuracy_loader``). The run folder's ``metrics.json`` gives the
accuracies and, when the code writes one, its own phase timings (key ``"time"``: a flat dict of
seconds), printed as they are. Run folders are measured (bytes, checkpoints apart) and removed.

    PYTHONPATH=. python benchmarks/e2e.py --config configs/spam-tiny.yaml --repo ../base-8625db1 --repo .
    PYTHONPATH=. python benchmarks/e2e.py --config configs/spam.yaml --set model.weights=random \\
        --set train.max_steps=40 --textbook
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTBOOK = "textbook"
PHASES = ("startup", "first_step", "steps", "between_steps", "final", "exit")
BOOK_LR, BOOK_WEIGHT_DECAY, BOOK_EVAL_FREQ, BOOK_EVAL_ITER = 5e-5, 0.1, 50, 5
# tqdm's standard bar: "train:  20%|██        | 130/650 [00:05<00:20, 25.1it/s, loss=0.41]"
BAR = re.compile(r"^\s*(?P<desc>[^|]*?):?\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[")
ACCURACY_KEYS = ("train_accuracy", "val_accuracy", "test_accuracy")


# ---- running a process, its output timestamped ---------------------------------------------------


@dataclass
class Process:
    returncode: int
    wall_s: float
    cpu_s: float
    """User + system CPU seconds of the process and its children: on a shared machine, less
    sensitive to the other jobs' load than the wall time."""
    started: float
    """time.time() when it started (the textbook job reports time.time() stamps)."""
    stdout: list[tuple[float, str]]
    stderr: list[tuple[float, str]]
    """Each line (or progress-bar update) with the seconds since the start at which it arrived."""


def _pump(stream, t0: float, out: list[tuple[float, str]]) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    while chunk := os.read(stream.fileno(), 65536):
        now = time.perf_counter() - t0
        parts = re.split(r"[\r\n]", pending + decoder.decode(chunk))
        pending = parts.pop()
        out.extend((now, p) for p in parts if p.strip())
        if pending.rstrip().endswith("]"):  # a progress bar is "\r" + bar, without a terminator
            out.append((now, pending))
            pending = ""
    if pending.strip():
        out.append((time.perf_counter() - t0, pending))


def run_process(cmd: list[str], env: dict[str, str]) -> Process:
    started, t0 = time.time(), time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    stdout: list[tuple[float, str]] = []
    stderr: list[tuple[float, str]] = []
    pumps = [threading.Thread(target=_pump, args=(s, t0, out), daemon=True)
             for s, out in ((proc.stdout, stdout), (proc.stderr, stderr))]
    for p in pumps:
        p.start()
    returncode = proc.wait()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # one child at a time: the delta is its
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for p in pumps:
        p.join()
    proc.stdout.close()
    proc.stderr.close()
    return Process(returncode, wall, cpu, started, stdout, stderr)


def child_env(pythonpath: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0", TQDM_MINITERS="1",
               GPTFT_PROGRESS="1")  # the training bar even though stderr is a pipe
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ---- the code to run -----------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    path: Path | None
    """A gptft checkout; None for the textbook."""
    gptft_file: str = ""


def _git(path: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def repo_target(spec: str) -> Target:
    """``PATH`` or ``NAME=PATH``; the label defaults to ``DIRNAME@SHORTHASH`` (+ when modified)."""
    name, path = None, Path(spec)
    if not path.exists() and "=" in spec:
        name, path = spec.split("=", 1)
        path = Path(path)
    path = path.resolve()
    if not (path / "launch" / "finetune.py").is_file():
        raise SystemExit(f"--repo {spec}: {path / 'launch' / 'finetune.py'} not found")
    if name is None:
        short = _git(path, "rev-parse", "--short", "HEAD")
        dirty = _git(path, "status", "--porcelain", "--untracked-files=no")
        name = path.name + (f"@{short}" if short else "") + ("+" if dirty else "")
    # From launch/ as the job runs (a script's folder, not the working directory, leads sys.path).
    check = subprocess.run([sys.executable, "-c", "import gptft; print(gptft.__file__)"], env=child_env(path),
                           capture_output=True, text=True, cwd=path / "launch")
    where = check.stdout.strip()
    if check.returncode != 0 or not Path(where).resolve().is_relative_to(path):
        raise SystemExit(f"--repo {spec}: with PYTHONPATH={path}, gptft is imported from "
                         f"{where or check.stderr.strip()[-300:]}, not from {path}")
    return Target(name, path, where)


# ---- one gptft run ---------------------------------------------------------------------------------


def folder_bytes(path: Path) -> tuple[int, int]:
    """Bytes of every file under ``path``, and of those under its ``checkpoints/``."""
    total = checkpoints = 0
    for f in path.rglob("*"):
        if f.is_file():
            size = f.stat().st_size
            total += size
            if f.relative_to(path).parts[0] == "checkpoints":
                checkpoints += size
    return total, checkpoints


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8"))
    return {}


def eval_steps(log: Path) -> set[int] | None:
    """Steps after which the trainer evaluated (a ``val/...`` line in log.jsonl)."""
    steps = set()
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            record = json.loads(line)
            if any(k.startswith("val/") for k in record):
                steps.add(int(record["step"]))
    return steps


def bar_phases(proc: Process, evaluated: set[int] | None) -> tuple[dict[str, float | None], dict]:
    """The phases from the training bar's per-step time stamps (see the module's docstring)."""
    phases: dict[str, float | None] = dict.fromkeys(PHASES)
    seen: dict[int, float] = {}
    last_bar = None
    for t, text in proc.stderr:
        m = BAR.match(text)
        if m and m["desc"].strip().lower().startswith(("train", "epoch")):  # "epoch 2/5": gptft
            seen.setdefault(int(m["n"]), t)
            last_bar = t
    info = {"bar_updates": len(seen)}
    last_out = max((t for t, _ in proc.stdout), default=None)
    if not seen or 0 not in seen or 1 not in seen or last_bar is None:
        return phases, info  # no bar (or not at every step): only the total
    t_start, t_first = seen[0], seen[1]
    phases["startup"], phases["first_step"] = t_start, t_first - t_start
    ks = sorted(k for k in seen if k >= 1)
    intervals = [(a, b, seen[b] - seen[a]) for a, b in zip(ks, ks[1:])]
    if evaluated is None:  # no log: call an interval an evaluation's when it is 3 x the median
        typical = statistics.median(d / (b - a) for a, b, d in intervals) if intervals else 0.0
        busy = [3 * typical * (b - a) < d for a, b, d in intervals]
    else:
        busy = [any(a <= e < b for e in evaluated) for a, b, _ in intervals]
    plain = [d / (b - a) for (a, b, d), x in zip(intervals, busy) if not x]
    per_step = statistics.median(plain) if plain else None
    if per_step is None and intervals:
        per_step = min(d / (b - a) for a, b, d in intervals)
    steps = sum(d if not x else per_step * (b - a) for (a, b, d), x in zip(intervals, busy))
    loop = last_bar - t_start
    phases["steps"] = steps
    phases["between_steps"] = max(loop - phases["first_step"] - steps, 0.0)
    if last_out is not None and last_out > last_bar:
        phases["final"], phases["exit"] = last_out - last_bar, proc.wall_s - last_out
    else:
        phases["final"] = proc.wall_s - last_bar
    info.update(median_step_s=per_step, steps_seen=max(ks),
                evaluations=len(evaluated) if evaluated is not None else None)
    return phases, info


def run_gptft(target: Target, opts: argparse.Namespace, run_dir: Path) -> dict:
    cmd = [sys.executable, str(target.path / "launch" / "finetune.py"), "--config", str(opts.config),
           *opts.set, *device_overrides(opts.device), f"output_dir={run_dir}"]
    proc = run_process(cmd, child_env(target.path))
    record = {"label": target.label, "kind": "gptft", "returncode": proc.returncode, "wall_s": proc.wall_s,
              "cpu_s": proc.cpu_s}
    if proc.returncode != 0:
        record["error"] = "\n".join(text for _, text in (proc.stderr + proc.stdout)[-15:])
        return record
    metrics = _read_json(run_dir / "metrics.json")
    phases, info = bar_phases(proc, eval_steps(run_dir / "log.jsonl"))
    timings = metrics.get("time") or metrics.get("timings")
    record.update(phases=phases, bar=info, metrics=_slim(metrics),
                  time=timings if isinstance(timings, dict) else None)
    return record


def device_overrides(device: str | None) -> list[str]:
    if device is None:
        return []  # the job's own train.device
    return ["train.device=cpu"] if device == "cpu" else ["train.device=auto"]


def _slim(metrics: dict) -> dict:
    """metrics.json without the long or nested entries (kept: numbers and short strings)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "time"}


# ---- the textbook's job (its own process) ---------------------------------------------------------


def book_code(choice: str):
    """The book's chapter-4/6 code: the package ``llms_from_scratch`` if it is importable (and
    ``choice`` allows), else ``textbook_ch06`` (a copy). Returns (namespace module, description)."""
    if choice in ("auto", "package"):
        try:
            from llms_from_scratch import ch04, ch06
        except ImportError:
            if choice == "package":
                raise SystemExit("--textbook-impl package: llms_from_scratch is not importable "
                                 "(pip install --no-deps llms-from-scratch)") from None
        else:
            ch06.GPTModel = ch04.GPTModel
            version = importlib.metadata.version("llms-from-scratch")
            return ch06, f"llms-from-scratch {version} (the book's own code)"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import textbook_ch06

    return textbook_ch06, "re-implementation (benchmarks/textbook_ch06.py)"


class StepBudget:
    """The training loader, stopped after ``max_steps`` training batches over all epochs. Only
    batches drawn while the model trains count: the book's ``evaluate_model`` and
    ``calc_accuracy_loader`` put it in eval mode before they read the loader."""

    def __init__(self, loader, model, max_steps: int):
        self.loader, self.model, self.max_steps, self.used = loader, model, max_steps, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.model.training:
                if self.used >= self.max_steps:
                    return
                self.used += 1
            yield batch


def book_splits(job, book, mode: str):
    """The train / validation / test DataFrames (columns Label, Text) the book writes as CSV."""
    import pandas as pd

    if mode == "gptft":  # gptft's reader: the same splits as the gptft job
        from gptft.data.classification import load_classification_data

        splits = load_classification_data(job.data)
        return [pd.DataFrame({"Label": s.labels, "Text": s.texts})
                for s in (splits.train, splits.val, splits.test)]
    if not job.data.path:
        raise SystemExit("--textbook-data book needs data.path (the SMSSpamCollection file)")
    df = pd.read_csv(job.data.path, sep="\t", header=None, names=["Label", "Text"])
    if job.data.balance:
        df = book.create_balanced_dataset(df)
    df["Label"] = df["Label"].map({"ham": 0, "spam": 1})
    return book.random_split(df, job.data.split[0], job.data.split[1])


def textbook_job(opts: argparse.Namespace) -> None:
    """The book's whole chapter-6 job, in this process; writes OUT/metrics.json with time stamps."""
    import tiktoken
    import torch
    from torch.utils.data import DataLoader

    from gptft.config import load_job
    from gptft.model import GPTConfig

    book, impl = book_code(opts.textbook_impl)
    marks = {"imports": time.time()}
    job = load_job(opts.config, opts.set)
    if job.task != "classification":
        raise SystemExit("--textbook: the textbook loop is chapter 6's classifier (a classification job)")
    if job.model.weights != "random":
        raise SystemExit("--textbook: both jobs start from random weights here; "
                         "add --set model.weights=random")
    out = Path(opts.textbook_job)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(opts.device or ("cuda" if job.train.device == "auto" and torch.cuda.is_available()
                                          else "cpu"))

    # Data: three CSV files, tokenized and padded to the longest training example (SpamDataset).
    names = ("train", "validation", "test")
    for name, frame in zip(names, book_splits(job, book, opts.textbook_data)):
        frame.to_csv(out / f"{name}.csv", index=None)
    tokenizer = tiktoken.get_encoding("gpt2")
    train_dataset = book.SpamDataset(csv_file=out / "train.csv", max_length=None, tokenizer=tokenizer)
    val_dataset = book.SpamDataset(csv_file=out / "validation.csv", max_length=train_dataset.max_length,
                                   tokenizer=tokenizer)
    test_dataset = book.SpamDataset(csv_file=out / "test.csv", max_length=train_dataset.max_length,
                                    tokenizer=tokenizer)
    batch_size = job.train.batch_size
    torch.manual_seed(123)
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                              drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=batch_size, num_workers=0, drop_last=False)
    test_loader = DataLoader(test_dataset, batch_size=batch_size, num_workers=0, drop_last=False)
    marks["data"] = time.time()

    # Model: GPTModel (random weights: the book loads OpenAI's here), all frozen, a 2-class head,
    # the last block and the final LayerNorm trainable; AdamW over model.parameters().
    shape = GPTConfig.from_name(job.model.name, **job.model.shape())
    cfg = {"vocab_size": 50257, "context_length": shape.context_length, "emb_dim": shape.emb_dim,
           "n_heads": shape.n_heads, "n_layers": shape.n_layers, "drop_rate": job.model.drop_rate,
           "qkv_bias": True}
    torch.manual_seed(123)
    model = book.GPTModel(cfg)
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(123)
    num_classes = int(train_dataset.data["Label"].nunique())
    model.out_head = torch.nn.Linear(in_features=cfg["emb_dim"], out_features=num_classes)
    for param in model.trf_blocks[-1].parameters():
        param.requires_grad = True
    for param in model.final_norm.parameters():
        param.requires_grad = True
    model.to(device)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY)
    marks["model"] = time.time()

    # Training: the book's loop, as it is; its evaluations timed by wrapping its functions.
    epochs, max_steps = job.train.epochs, job.train.max_steps
    loader = train_loader
    if max_steps:
        epochs = min(epochs, math.ceil(max_steps / len(train_loader)))
        loader = StepBudget(train_loader, model, max_steps)
    step_times: list[float] = []
    optimizer.register_step_post_hook(lambda *_: step_times.append(time.time()))
    spent = {"evaluate_model": 0.0, "calc_accuracy_loader": 0.0}
    originals = {name: getattr(book, name) for name in spent}

    def timed(name):
        def wrapper(*args, **kwargs):
            t = time.time()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.time() - t
        return wrapper

    for name in spent:
        setattr(book, name, timed(name))
    marks["loop_start"] = time.time()
    try:
        train_losses, val_losses, train_accs, val_accs, examples_seen = book.train_classifier_simple(
            model, loader, val_loader, optimizer, device, num_epochs=epochs,
            eval_freq=BOOK_EVAL_FREQ, eval_iter=BOOK_EVAL_ITER)
    finally:
        for name, function in originals.items():
            setattr(book, name, function)
    marks["loop_end"] = time.time()

    accuracy = {f"{split}_accuracy": book.calc_accuracy_loader(dl, model, device)
                for split, dl in (("train", train_loader), ("val", val_loader), ("test", test_loader))}
    marks["final_accuracy"] = time.time()
    torch.save(model.state_dict(), out / "review_classifier.pth")
    marks["saving"] = time.time()
    print(f"Training accuracy: {accuracy['train_accuracy'] * 100:.2f}%")
    print(f"Validation accuracy: {accuracy['val_accuracy'] * 100:.2f}%")
    print(f"Test accuracy: {accuracy['test_accuracy'] * 100:.2f}%")

    first = step_times[0] if step_times else marks["loop_end"]
    evaluations = spent["evaluate_model"] + spent["calc_accuracy_loader"]
    seconds = {
        "data": marks["data"] - marks["imports"],
        "model": marks["model"] - marks["data"], "first_step": first - marks["loop_start"],
        "train": marks["loop_end"] - first - evaluations,
        "evaluation": spent["evaluate_model"], "epoch_accuracy": spent["calc_accuracy_loader"],
        "final_accuracy": marks["final_accuracy"] - marks["loop_end"],
        "saving": marks["saving"] - marks["final_accuracy"]}
    metrics = {**accuracy, "steps": len(step_times), "examples_seen": examples_seen, "epochs": epochs,
               "max_length": train_dataset.max_length, "implementation": impl, "data": opts.textbook_data,
               "device": str(device), "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                   if p.requires_grad),
               "train_losses": train_losses, "val_losses": val_losses, "train_accs": train_accs,
               "val_accs": val_accs, "time": seconds, "marks": marks}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def run_textbook(opts: argparse.Namespace, run_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--textbook-job", str(run_dir),
           "--config", str(opts.config), "--textbook-impl", opts.textbook_impl,
           "--textbook-data", opts.textbook_data, *[f"--set={s}" for s in opts.set]]
    if opts.device:
        cmd += ["--device", opts.device]
    proc = run_process(cmd, child_env(ROOT))
    record = {"label": TEXTBOOK, "kind": TEXTBOOK, "returncode": proc.returncode, "wall_s": proc.wall_s,
              "cpu_s": proc.cpu_s}
    metrics = _read_json(run_dir / "metrics.json")
    if proc.returncode != 0 or not metrics:
        record["error"] = "\n".join(text for _, text in (proc.stderr + proc.stdout)[-15:])
        return record
    marks = {k: v - proc.started for k, v in metrics.pop("marks").items()}
    seconds = {"imports": marks["imports"], **metrics["time"], "total": proc.wall_s}  # from process start
    loop = marks["loop_end"] - marks["loop_start"]
    between = seconds["evaluation"] + seconds["epoch_accuracy"]
    phases = {"startup": marks["loop_start"], "first_step": seconds["first_step"],
              "steps": loop - seconds["first_step"] - between, "between_steps": between,
              "final": marks["saving"] - marks["loop_end"], "exit": proc.wall_s - marks["saving"]}
    record.update(phases=phases, metrics=_slim(metrics), time=seconds,
                  curves={k: metrics[k] for k in ("train_losses", "val_losses", "train_accs", "val_accs")})
    return record


# ---- the benchmark -----------------------------------------------------------------------------------


def environment() -> dict:
    from gptft.cpu import cpu_name  # the checkout's running this harness (stdlib only)

    versions = {}
    for package in ("torch", "accelerate", "llms-from-scratch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), **versions,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(values) if values else None


def outside_share(record: dict) -> float | None:
    """The share of the wall time outside the training steps (first step included in the steps)."""
    p = record.get("phases") or {}
    if p.get("steps") is None or p.get("first_step") is None:
        return None
    return 1 - (p["first_step"] + p["steps"]) / record["wall_s"]


def summarize(runs: list[dict], labels: list[str]) -> dict:
    summary = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        ok = [r for r in mine if r["returncode"] == 0 and "error" not in r]
        entry = {"kind": mine[0]["kind"], "runs": len(ok), "failed": len(mine) - len(ok),
                 "wall_s": [r["wall_s"] for r in ok], "wall_s_median": _median([r["wall_s"] for r in ok]),
                 "cpu_s_median": _median([r.get("cpu_s") for r in ok])}
        entry["phases_median"] = {k: _median([r["phases"].get(k) for r in ok]) for k in PHASES}
        entry["time_to_first_step_s_median"] = _median([r.get("time_to_first_step_s") for r in ok])
        entry["outside_steps_share_median"] = _median([outside_share(r) for r in ok])
        for key in (*ACCURACY_KEYS, "test_loss", "val_loss", "train_loss", "steps"):
            values = [r["metrics"].get(key) for r in ok if isinstance(r["metrics"].get(key), int | float)]
            if values:
                entry[key] = _median(values)
        timing_keys = list(dict.fromkeys(k for r in ok if r.get("time") for k in r["time"]))
        entry["time_median"] = ({k: _median([(r.get("time") or {}).get(k) for r in ok]) for k in timing_keys}
                                or None)
        for key in ("run_dir_bytes", "checkpoint_bytes"):
            entry[key] = _median([r.get(key) for r in ok])
        summary[label] = entry
    return summary


def paired_ratio(runs: list[dict], label: str, reference: str, key: str = "wall_s") -> float | None:
    """Median over repeats of wall(label) / wall(reference) (or another `key`), repeat by repeat."""
    walls: dict[str, dict[int, float]] = {}
    for r in runs:
        if r["returncode"] == 0 and "error" not in r and r.get(key) is not None:
            walls.setdefault(r["label"], {})[r["repeat"]] = r[key]
    mine, ref = walls.get(label, {}), walls.get(reference, {})
    pairs = [mine[k] / ref[k] for k in mine if k in ref]
    return statistics.median(pairs) if pairs else None


def run_benchmark(opts: argparse.Namespace) -> dict:
    env = environment()
    targets = [repo_target(spec) for spec in (opts.repo or [str(ROOT)])]
    labels = [t.label for t in targets]
    for i, t in enumerate(targets):  # the same checkout twice: tell them apart
        if labels.count(t.label) > 1:
            t.label = f"{t.label}#{labels[:i + 1].count(t.label)}"
    if opts.textbook:
        targets.append(Target(TEXTBOOK, None))
    labels = [t.label for t in targets]
    runs: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="gptft-e2e-", dir=opts.workdir))
    try:
        for repeat in range(opts.repeats):
            for i, target in enumerate(targets):
                run_dir = workdir / f"r{repeat}-{i}-{re.sub(r'[^A-Za-z0-9_.-]', '_', target.label)}"
                load = [round(x, 2) for x in os.getloadavg()]
                if target.path is None:
                    record = run_textbook(opts, run_dir)
                else:
                    record = run_gptft(target, opts, run_dir)
                record.update(repeat=repeat, load_average_before=load)
                phases = record.get("phases") or {}
                if phases.get("startup") is not None and phases.get("first_step") is not None:
                    record["time_to_first_step_s"] = phases["startup"] + phases["first_step"]
                if run_dir.is_dir():
                    record["run_dir_bytes"], record["checkpoint_bytes"] = folder_bytes(run_dir)
                    if not opts.keep:
                        shutil.rmtree(run_dir, ignore_errors=True)
                runs.append(record)
                print(progress_line(record), flush=True)
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs, labels)
    reference = labels[0]
    for label, entry in summary.items():
        ref = summary[reference]["wall_s_median"]
        wall = entry["wall_s_median"]
        entry["wall_vs_reference"] = wall / ref if wall and ref else None
        entry["wall_vs_reference_paired"] = paired_ratio(runs, label, reference)
        entry["cpu_vs_reference_paired"] = paired_ratio(runs, label, reference, "cpu_s")
    out = {"settings": {"config": str(opts.config), "set": opts.set, "repeats": opts.repeats,
                        "device": opts.device, "textbook": opts.textbook,
                        "textbook_impl": opts.textbook_impl, "textbook_data": opts.textbook_data,
                        "targets": [{"label": t.label, "path": str(t.path) if t.path else None,
                                     "gptft_file": t.gptft_file} for t in targets],
                        "workdir": str(workdir) if opts.keep else None},
           "environment": env, "reference": reference, "runs": runs, "summary": summary}
    if opts.textbook and summary[TEXTBOOK]["runs"]:
        out["textbook_implementation"] = next(r["metrics"]["implementation"] for r in runs
                                              if r["label"] == TEXTBOOK and "metrics" in r)
        out["speedup_vs_textbook"] = {label: paired_ratio(runs, TEXTBOOK, label)
                                      for label in labels if label != TEXTBOOK}
    return out


# ---- the report ----------------------------------------------------------------------------------


def _s(x: float | None, width: int = 8, digits: int = 1) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def _pct(x: float | None, width: int = 7) -> str:
    return f"{100 * x:>{width - 1}.1f}%" if x is not None else f"{'-':>{width}}"


def progress_line(r: dict) -> str:
    if "error" in r:
        return f"[repeat {r['repeat'] + 1}] {r['label']}: FAILED (exit {r['returncode']})\n{r['error']}"
    acc = r["metrics"].get("test_accuracy")
    acc = f", test accuracy {100 * acc:.2f}%" if isinstance(acc, float) else ""
    return (f"[repeat {r['repeat'] + 1}] {r['label']}: {r['wall_s']:.1f} s{acc} "
            f"(load average before {r['load_average_before'][0]:.2f})")


def format_report(out: dict) -> str:
    env, s = out["environment"], out["settings"]
    lines = ["", f"{env['date']}; {env['cpu']} ({env['cpu_count']} CPUs); torch {env.get('torch', '?')}; "
             f"load average at start {' '.join(f'{x:.2f}' for x in env['load_average'])}",
             f"job: --config {s['config']} {' '.join(s['set'])}; median of {s['repeats']} interleaved "
             f"repeat(s); wall = process start to exit, phases in seconds", ""]
    head = (f"{'run':<26}{'wall':>8}{'cpu':>8}{'startup':>9}{'1st step':>9}{'steps':>8}{'between':>9}"
            f"{'final':>8}"
            f"{'exit':>7}{'outside':>9}{'steps#':>7}{'train acc':>10}{'val acc':>9}{'test acc':>9}"
            f"{'folder MB':>11}{'ckpt MB':>9}{'vs ref':>8}")
    lines.append(head)
    for label, e in out["summary"].items():
        p = e["phases_median"]
        mb = (lambda b: f"{b / 1e6:>9.1f}" if b is not None else f"{'-':>9}")
        lines.append(
            f"{label[:25]:<26}{_s(e['wall_s_median'])}{_s(e.get('cpu_s_median'))}"
            f"{_s(p['startup'], 9)}{_s(p['first_step'], 9, 2)}"
            f"{_s(p['steps'])}{_s(p['between_steps'], 9)}{_s(p['final'])}{_s(p['exit'], 7)}"
            f"{_pct(e['outside_steps_share_median'], 9)}{_s(e.get('steps'), 7, 0)}"
            f"{_pct(e.get('train_accuracy'), 10)}{_pct(e.get('val_accuracy'), 9)}"
            f"{_pct(e.get('test_accuracy'), 9)}"
            f"{mb(e['run_dir_bytes'])}  {mb(e['checkpoint_bytes'])}"
            + (f"{e['wall_vs_reference']:>7.2f}x" if e["wall_vs_reference"] is not None else f"{'-':>8}")
            + (f"  ({e['failed']} failed)" if e["failed"] else ""))
    lines += ["", "cpu = user + system CPU seconds of the job's processes",
              "between = evaluations and checkpoints inside the training loop; final = after it (final "
              "evaluation, saving, plots); outside = share of the wall time outside the training steps "
              "(1st step + steps)"]
    ref = out["reference"]
    for label, e in out["summary"].items():
        if label not in (ref, TEXTBOOK) and e["wall_vs_reference_paired"] is not None:
            lines.append(f"wall {label} / {ref}: {e['wall_vs_reference']:.2f}x by medians, "
                         f"{e['wall_vs_reference_paired']:.2f}x paired"
                         + (f"; cpu {e['cpu_vs_reference_paired']:.2f}x paired"
                            if e.get("cpu_vs_reference_paired") is not None else ""))
    for label, ratio in (out.get("speedup_vs_textbook") or {}).items():
        if ratio is not None:
            lines.append(f"wall textbook / {label}: {ratio:.2f}x (paired repeats)")
    for label, e in out["summary"].items():
        if e["time_median"]:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in e["time_median"].items() if v is not None)
            lines.append(f"{label} reports (metrics.json \"time\", s): {parts}")
    if "textbook_implementation" in out:
        data = "gptft's splits" if s["textbook_data"] == "gptft" else "the book's pandas reading and split"
        lines.append(f"textbook code: {out['textbook_implementation']}; data: {data}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="the job's YAML file (the same for every run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override passed to every job (repeatable), e.g. --set train.max_steps=40")
    p.add_argument("--repo", action="append", metavar="[NAME=]PATH",
                   help="a gptft checkout to run (repeatable; default: this one); the first is the reference")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved")
    p.add_argument("--textbook", action="store_true", help="also run the textbook's chapter-6 job")
    p.add_argument("--textbook-impl", choices=("auto", "package", "reimplementation"), default="auto",
                   help="the book's code: the llms-from-scratch package if importable, else a copy")
    p.add_argument("--textbook-data", choices=("gptft", "book"), default="gptft",
                   help="gptft: gptft's splits (the same test set); "
                        "book: the book's pandas reading and split")
    p.add_argument("--device", help="cpu or cuda (default: the job's train.device)")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--workdir", help="where the run folders go (default: the system's temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--textbook-job", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.config = opts.config.resolve()
    if not opts.config.is_file():
        p.error(f"--config {opts.config}: not found")
    for s in opts.set:
        if "=" not in s:
            p.error(f"--set {s}: expected key=value")
    if opts.repeats < 1:
        p.error("--repeats must be positive")
    if opts.device not in (None, "cpu", "cuda"):
        p.error("--device: cpu or cuda")
    return opts


def main(argv: list[str] | None = None) -> dict | None:
    opts = parse_args(argv)
    if opts.textbook_job:
        textbook_job(opts)
        return None
    out = run_benchmark(opts)
    print(format_report(out), flush=True)
    if opts.output:
        opts.output.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    result = main()
    if result is not None and any(e["failed"] for e in result["summary"].values()):
        sys.exit(1)
