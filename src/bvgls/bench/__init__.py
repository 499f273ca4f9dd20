"""Offline transfer benchmark: the ``fmnist-resnet`` source model and the few-shot target tasks.

Importing this module registers the model ``fmnist-resnet`` in ``bvgls.registry.MODELS`` and
the tasks ``offline:<name>`` in ``bvgls.registry.DATASETS``. The protocol that uses them is
frozen in ``docs/benchmark.md``; ``bvgls.bench`` runs it.
"""

from .tasks import (
    TASKS,
    FewShotTask,
    build_task,
    export_image_folder,
    font_families,
    task_names,
)
from .source_model import (
    CHECKPOINT_SHA256,
    FMNIST_INPUT,
    ChecksumError,
    FMNISTResNet,
    build_fmnist_resnet,
    file_sha256,
    load_checkpoint,
    pretrain,
    read_fashion_mnist,
)

__all__ = [
    "CHECKPOINT_SHA256", "FMNIST_INPUT", "TASKS", "ChecksumError", "FMNISTResNet", "FewShotTask",
    "build_fmnist_resnet", "build_task", "export_image_folder", "file_sha256", "font_families",
    "load_checkpoint", "pretrain", "read_fashion_mnist", "task_names",
]


def __getattr__(name: str):
    # the benchmark runner and report need the runner; loading the registrations above must not
    import importlib
    if name.startswith("__"):
        raise AttributeError(name)
    report = importlib.import_module("bvgls.bench.report")
    try:
        return getattr(report, name)
    except AttributeError:
        raise AttributeError(f"module 'bvgls.bench' has no attribute {name!r}") from None
