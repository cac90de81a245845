"""Example tasks with data that ships inside packages (no downloads at run time)."""

from gossiptrain.tasks.base import Task, load_task
from gossiptrain.tasks.charlm import charlm_task
from gossiptrain.tasks.digits import digits_task

TASKS = {"digits": digits_task, "charlm": charlm_task}

__all__ = ["TASKS", "Task", "charlm_task", "digits_task", "load_task"]
