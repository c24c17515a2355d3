"""The torch half of each task, one module per task, each registered once by name (evim3.tasks.base explains
what a task implements); the model (its head), the trainer and `evim3 eval` read the registry through
`task_class`. The edge half of each is the TaskSpec of the same name in evim3.runtime.tasks.

    ef               evim3/tasks/ef.py
    classification   evim3/tasks/classification.py
    seg              evim3/tasks/seg.py

Pre-training (evim3/tasks/pretrain.py) trains an encoder, not a task's model: it is not registered.
A new task: a module with a `Task` subclass decorated with `@register`, imported before it is used.
"""

from evim3.tasks import classification, ef, seg  # noqa: F401  (importing a task module registers it)
from evim3.tasks.base import Task, register, task_class

__all__ = ["Task", "register", "task_class"]
