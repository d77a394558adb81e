"""The task registry: one place maps a task name to its job config class and its task class.

A task is a job config class (a ``gptft.config.JobConfig`` with the task's ``data`` section) and a
task class (a ``gptft.task.TaskBase``): what data to load, which model to build, the loss, the
metrics and the files a finished run leaves behind (its ``outputs``). Both are named as
``"module:Class"`` strings and imported only when used, so reading a config never imports torch,
and this module, low in the package, imports no task: the entries name them (the one import made
here is ``_resolve``'s, by name, when a task is used). Adding a task is one ``register_task`` call
(here, for gptft's own tasks; anywhere before ``load_job`` for others).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from gptft.errors import GPTFTError


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the ``task:`` value of its job configs (and ``gptft.json``).
        job: its job config class, or ``"module:Class"``.
        task: its task class, or ``"module:Class"``.
        produces: what its run folder's weights are: ``lm`` (a GPT language model: ``gptft
            generate``, ``gptft export``) or ``classifier`` (``gptft classify``).
    """

    name: str
    job: type | str
    task: type | str
    produces: Literal["lm", "classifier"]

    def job_class(self) -> type:
        return _resolve(self.job)

    def task_class(self) -> type:
        return _resolve(self.task)

    def outputs(self) -> tuple:
        """What the task declares it writes (``TaskBase.outputs``: figures, records, matrices)."""
        return tuple(getattr(self.task_class(), "outputs", ()))


TASKS: dict[str, TaskSpec] = {}
DEFAULT_TASK = "classification"  # a job file without ``task:``


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task in the registry."""
    TASKS[spec.name] = spec
    return spec


def get_task(name: object, where: str = "task") -> TaskSpec:
    """The registered task `name`, or one error naming `where` and the known tasks."""
    if name not in TASKS:
        raise GPTFTError(f"{where}: must be one of {', '.join(TASKS)} (got {name!r})")
    return TASKS[name]


def declared_outputs() -> tuple:
    """The outputs every registered task declares (what ``train.overwrite`` may remove: an
    earlier run of any task may have written them)."""
    return tuple(dict.fromkeys(o for spec in TASKS.values() for o in spec.outputs()))


def _resolve(target: type | str) -> type:
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


register_task(TaskSpec("classification", "gptft.tasks.classification.config:ClassificationJob",
                       "gptft.tasks.classification.task:ClassificationTask", produces="classifier"))
register_task(TaskSpec("instruction", "gptft.tasks.instruction.config:InstructionJob",
                       "gptft.tasks.instruction.task:InstructionTask", produces="lm"))
register_task(TaskSpec("preference", "gptft.tasks.preference.config:PreferenceJob",
                       "gptft.tasks.preference.task:PreferenceTask", produces="lm"))
