"""The training runner above the library: one config (:mod:`.config`), the loop (:mod:`.loop`),
run directories (:mod:`.rundir`), the selection tracker (:mod:`.tracker`), the strategy grid
(:mod:`.grid`), the shared lr search (:mod:`.lrsearch`), model and dataset builders, plots.

Imports only downward (the library); never the benchmark or the CLI.
"""
