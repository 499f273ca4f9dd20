"""The training runner above the library: one config (:mod:`.config`), the loop (:mod:`.loop`),
run directories (:mod:`.rundir`), the selection tracker (:mod:`.tracker`), the strategy grid
(:mod:`.grid`), the shared lr search (:mod:`.lrsearch`), model and dataset builders, plots.

Importing the runner registers the library's models (:mod:`.models`) and datasets (:mod:`.data`)
in :data:`bvgls.registry.MODELS` and :data:`bvgls.registry.DATASETS`. Imports only downward
(the library); never the command line nor the lab.
"""

from . import data, models  # noqa: F401  (register the library's models and datasets)
