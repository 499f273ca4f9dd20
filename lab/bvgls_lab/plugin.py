"""The lab's models and datasets, registered in the library's registries on import.

The ``bvgls`` command line imports this module through the ``bvgls.plugins`` entry point
declared in ``lab/pyproject.toml``; the ``bvgls-lab`` command and Python code import it
directly. Importing it twice registers nothing twice.
"""

from . import offline_tasks, source_model  # noqa: F401  (fmnist-resnet, offline:<task>)
from .pretrained import register  # noqa: F401  (torchvision families, efficientnet_lite0, image tasks)
