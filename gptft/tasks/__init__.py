"""gptft's tasks, one package each (classification, instruction, preference); the registry that
names them is ``gptft.registry`` (re-exported here for the imports of earlier versions)."""

from gptft.registry import DEFAULT_TASK, TASKS, TaskSpec, get_task, register_task  # noqa: F401
