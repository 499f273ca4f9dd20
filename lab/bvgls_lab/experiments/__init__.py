"""The accuracy experiments (``bvgls-lab bench``) and their quick version (``bvgls-lab demo``).

- :mod:`.protocols`: the frozen protocols of ``docs/experiments/offline.md`` and
  ``docs/experiments/pretrained.md`` (``BENCH``, ``DEMO``, ...);
- :mod:`.run`: the process pool over (task, strategy) cells, each an lr search (the runner's,
  shared with ``bvgls compare``) and the final runs;
- :mod:`.report`: statistics, report, figures; :mod:`.ablation`: the batch-size / lr ablation's
  report over two experiment directories.

The commands are in :mod:`bvgls_lab.cli`: this package never imports a command line.
"""
