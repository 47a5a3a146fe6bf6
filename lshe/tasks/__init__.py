"""Evaluation tasks. `TASKS` maps each task's config name to its class; `make_task` builds one by name."""

from __future__ import annotations

from lshe.tasks.base import Example, Task
from lshe.tasks.gsm import GSMSymbolic
from lshe.tasks.niah import NIAH, niah_heatmap
from lshe.tasks.passkey import Passkey
from lshe.tasks.perplexity import Perplexity
from lshe.tasks.ruler import RulerCommonWords, RulerVariableTracking
from lshe.tasks.summarize import Summarize

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (Passkey, NIAH, RulerVariableTracking, RulerCommonWords, GSMSymbolic, Perplexity, Summarize)
}


def make_task(name: str, **kwargs) -> Task:
    """The task registered as ``name``, built with ``kwargs`` (ValueError listing the names if unknown)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Example", "Task", "make_task", "niah_heatmap"]
