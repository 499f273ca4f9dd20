"""The bvgls lab: the experiments run with the library, kept beside it and out of its wheel.

- :mod:`.source_model`: the ``fmnist-resnet`` source model, its checkpoint and its training;
  :mod:`.offline_tasks`: the few-shot target tasks built from offline data;
- :mod:`.experiments`: the frozen protocols, the process pool over (task, strategy) cells, the
  reports, figures and ablations;
- :mod:`.pretrained`: the ImageNet backbones and real-image tasks, set up from package
  registries at set-up time;
- :mod:`.plugin`: the registrations of the lab's models and datasets, loaded by the ``bvgls``
  command line through the ``bvgls.plugins`` entry point;
- :mod:`.cli`: the ``bvgls-lab`` command (``pretrain``, ``export-task``, ``bench``, ``demo``).

Importing this package imports nothing: the library never imports the lab.
"""
