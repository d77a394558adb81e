"""Stop on a signal with a checkpoint, and stop when the launcher dies.

SIGTERM (SLURM's preemption and time limit, ``scancel``, ``kill``), SIGINT (Ctrl-C) and SIGUSR1
(``sbatch --signal``) only ask the run to stop: the handler sets a flag. Each training step adds
this process's flag to the sum the processes already reduce at the step's start (its number of
loss units), so every process learns of the request at the same step; the trainer then saves a
checkpoint of that step and raises ``Interrupted``, which the command line turns into one line
and exit status ``EXIT_INTERRUPTED``. On a CUDA device the summed flag is copied to the host
without waiting and read one step later, so a step still never waits for the device.

A second Ctrl-C while the run stops raises ``KeyboardInterrupt`` (the command line prints one
line); repeated SIGTERM / SIGUSR1 (a launcher forwarding the signal it got) are ignored.

Outside the training loop (start-up, data loading, resume loading, the final evaluation, saving,
the outputs) ``gptft.run`` holds a request of its own for the whole job: the trainer's takes
over a signal that came before the loop and hands back one that came after it, and the job acts on
it where one phase ends (``agreed``: every process alike). The long loops of those phases (the
final evaluation, the generation of the test responses, DPO's reference log-probabilities) do not
wait for their end: ``BatchStops`` asks between two batches, every process at the same batch.
``GPTFT_SIGNAL_AT=PHASE[@K]:SIGNAL[:RANK]`` sends SIGNAL to the process (of that rank) as PHASE
begins, or with ``@K`` after the K-th batch of a loop of that name (``signal_at``), so tests can
stop a run in each phase.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from gptft.errors import GPTFTError

EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, resumable; try again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1


class Interrupted(GPTFTError):
    """The run stopped on a signal after saving a checkpoint (exit status ``EXIT_INTERRUPTED``)."""


class StopRequest:
    """The signal-set stop flag of this process, and the agreement on it across processes.

    ``install`` (main thread only) replaces the handlers of ``STOP_SIGNALS`` until ``restore``.
    Each step, ``vote()`` gives this process's flag as a number to add to the step's reduction,
    ``record(total)`` keeps the reduced sum, and ``due()`` says (alike on every process) whether
    to stop now. `loops`: whether long loops (``BatchStops``) act on it between their batches
    (the training loop's request acts at step ends only: a validation runs to its end).
    """

    def __init__(self, device: Any = None, loops: bool = True):
        self.signum, self.loops = 0, loops
        self._old: dict[int, Any] = {}
        self._outer: StopRequest | None = None  # the request installed before this one
        self._lag = 1 if getattr(device, "type", "cpu") == "cuda" else 0
        self._pending: deque = deque()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
            outer = getattr(self._old[s], "__self__", None)
            if isinstance(outer, StopRequest):  # take over a signal that came before
                self._outer, self.signum = outer, self.signum or outer.signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()
        if self._outer is not None:  # hand back a signal not acted on yet
            self._outer.signum = self._outer.signum or self.signum
            self._outer = None

    def agreed(self, accelerator: Any = None) -> bool:
        """Whether some process asked to stop: the same answer on every process (a collective
        when there are several, so every process must ask at the same point)."""
        if accelerator is None or accelerator.num_processes == 1:
            return bool(self.signum)
        import torch

        flag = torch.tensor(1.0 if self.signum else 0.0, device=accelerator.device)
        total = accelerator.reduce(flag, reduction="sum").item()
        if total and not self.signum:  # another process got it: report the same
            self.signum = signal.SIGTERM
        return total > 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self.signum = self.signum or signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def vote(self) -> float:
        return 1.0 if self.signum else 0.0

    def record(self, total) -> None:
        """Keep the step's reduced flag sum (a device scalar); on CUDA copy it to pinned host
        memory without waiting, to be read a step later."""
        import torch

        if self._lag:
            host = torch.empty((), dtype=total.dtype, pin_memory=True)
            host.copy_(total, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:
            self._pending.append((total, None))

    def due(self) -> bool:
        """Whether some process asked to stop at the step whose sum is read now (the same step
        on every process)."""
        if len(self._pending) <= self._lag:
            return False
        value, event = self._pending.popleft()
        if event is not None:
            event.synchronize()  # recorded a step ago: done, or nearly
        return bool(value.item() > 0)


def installed_request() -> StopRequest | None:
    """The ``StopRequest`` whose handler SIGTERM has now (None: a default or someone else's)."""
    request = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return request if isinstance(request, StopRequest) else None


def loop_request() -> StopRequest | None:
    """The installed request, if long loops act on it (``StopRequest.loops``)."""
    request = installed_request()
    return request if request is not None and request.loops else None


class BatchStops:
    """The stop checks of a long loop, one after each batch: when every process agreed to stop
    (``StopRequest.agreed``, a collective), ``on_stop(signal name, where)`` ends the loop (it
    raises: saves what can be saved and raises ``Interrupted``).

    Every process must check as often as the others. A loop whose processes hold different
    numbers of batches gives its own count as `batches` (one collective, here) and calls
    ``finish()`` after it: the checks the others still make are made there. Without an installed
    request (outside ``gptft finetune``), or during the training loop (whose request acts at step
    ends: ``StopRequest.loops``), nothing is checked.

    Args:
        accelerator: the run's (None: one process).
        phase: the loop's name, in the stop's line and in ``GPTFT_SIGNAL_AT=PHASE@K`` (``signal_at``).
        on_stop: called with the signal's name and where the loop stopped; it raises.
        batches: this process's number of batches, when it may differ from the others'.
    """

    def __init__(self, accelerator: Any, phase: str, on_stop: Callable[[str, str], NoReturn],
                 batches: int | None = None):
        self.accelerator, self.phase, self.on_stop = accelerator, phase, on_stop
        self.request = loop_request()
        self.count, self.most = 0, 0
        several = accelerator is not None and accelerator.num_processes > 1
        if batches is not None and self.request is not None and several:
            from accelerate.utils import gather_object

            self.most = max(gather_object([batches]))

    def __call__(self) -> None:
        """After a batch: stop here if every process agreed to."""
        self.count += 1
        signal_at(self.phase, self.count)
        if self.request is not None and self.request.agreed(self.accelerator):
            self.on_stop(self.request.name, f"{self.phase} (after batch {self.count})")

    def finish(self) -> None:
        """The checks this process still owes the others (it had fewer batches)."""
        while self.count < self.most:
            self()


def stop_before_the_folder(name: str, where: str) -> NoReturn:
    """``BatchStops``' `on_stop` for a loop that runs before the run folder changes (DPO's
    reference log-probabilities, in data loading)."""
    raise Interrupted(f"stopped by {name} during the {where}, before the run folder changed: "
                      "nothing to save; run the same command again")


def signal_at(phase: str, batch: int | None = None) -> None:
    """Testing hook: with ``GPTFT_SIGNAL_AT=PHASE:SIGNAL[:RANK]`` (e.g. ``final evaluation:SIGTERM``),
    send SIGNAL to this process (if its ``RANK`` matches, when given) as `phase` begins; with
    ``PHASE@K:SIGNAL[:RANK]`` after the K-th `batch` of the loop named `phase` (``BatchStops``)."""
    wanted = os.environ.get("GPTFT_SIGNAL_AT", "")
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    signame, _, rank = rest.partition(":")
    if name == (phase if batch is None else f"{phase}@{batch}") and (
            not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), getattr(signal, signame or "SIGTERM"))


def watch_parent() -> None:
    """Under a launcher (``accelerate launch`` / torchrun), get SIGTERM when the launcher dies
    (Linux ``PR_SET_PDEATHSIG``), so an orphaned worker saves and stops instead of running on."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the watch was set
        os.kill(os.getpid(), signal.SIGTERM)
