"""One :class:`Task` per model task: the parts of a run that differ between tasks."""

from __future__ import annotations

from .base import Task

__all__ = ["Task", "get_task"]


def get_task(name: str) -> Task:
    """The :class:`Task` of a registry task name (``frostnet.models.get_model_task``)."""
    # imported here: each task pulls in its own data stack (pycocotools for detection)
    if name == "classification":
        from .classification import ClassificationTask

        return ClassificationTask()
    if name == "segmentation":
        from .segmentation import SegmentationTask

        return SegmentationTask()
    if name == "detection":
        from .detection import DetectionTask

        return DetectionTask()
    raise ValueError(f"unknown task {name!r}; valid choices: classification, segmentation, detection")
