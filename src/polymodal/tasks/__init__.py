"""Tasks: what an any-to-any model trains on. Registered in ``TASKS``; ``model.tasks`` names them.

A task is built with wiring ``(dim, modalities)`` (the backbone width and the modalities the model
has encoders for) and keyword-only settings. A generation task (``image_to_text`` ...) names its
source and target modalities and picks each batch's items and inputs; the model's head for the
target (``polymodal.heads``) lays out the sequence, computes the named loss and generates. The
``contrastive`` task aligns every pair of modalities with InfoNCE.

Adding a task is one file: a class (or a ``functools.partial`` of ``GenerationTask`` binding a new
source/target pair) and its registry line; a new target needs a head registered in ``HEADS``.
"""

from polymodal.registry import Registry

TASKS: Registry = Registry("task")

from polymodal.tasks import contrastive, generation  # noqa: E402,F401  (register parts)
from polymodal.tasks.contrastive import ContrastiveTask  # noqa: E402
from polymodal.tasks.generation import GenerationTask, TaskBatch  # noqa: E402

__all__ = ["TASKS", "ContrastiveTask", "GenerationTask", "TaskBatch"]
