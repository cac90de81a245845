"""Example tasks with data that ships inside packages (no downloads at run time)."""

from gossiptrain.tasks.base import Task
from gossiptrain.tasks.digits import digits_task

TASKS = {"digits": digits_task}

__all__ = ["TASKS", "Task", "digits_task"]
