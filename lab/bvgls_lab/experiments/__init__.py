"""The offline transfer benchmark (``bvgls bench``) and its quick version (``bvgls demo``).

- :mod:`.source_model`: the ``fmnist-resnet`` source model; :mod:`.tasks`: the few-shot
  target tasks. Importing this package registers both (``bvgls.registry.MODELS`` /
  ``DATASETS``, as ``fmnist-resnet`` and ``offline:<name>``), and nothing more.
- :mod:`.protocol`: the frozen protocol of ``docs/benchmark.md`` (:data:`BENCH`, :data:`DEMO`);
  :mod:`.run`: the process pool over (task, strategy) cells, each an lr search (the runner's,
  shared with ``bvgls compare``) and the final runs; :mod:`.report`: statistics, report, figures;
  :mod:`.ablation`: the batch-size / lr ablation's report over two benchmark directories.

Their names are served from here on first use (``bvgls.bench.run_benchmark``, ``BENCH``, ...).
The commands are in :mod:`bvgls.cli.bench`: this package never imports the CLI.
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


_LAZY_MODULES = ("bvgls.bench.protocol", "bvgls.bench.run", "bvgls.bench.report", "bvgls.bench.ablation")


def __getattr__(name: str):
    import importlib

    if not name.startswith("__"):
        for module in _LAZY_MODULES:
            value = getattr(importlib.import_module(module), name, _NOT_FOUND)
            if value is not _NOT_FOUND:
                return value
    raise AttributeError(f"module 'bvgls.bench' has no attribute {name!r}")


_NOT_FOUND = object()
