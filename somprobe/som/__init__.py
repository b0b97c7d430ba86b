"""Self-organizing maps on a torus: geometry (``grid``), the map (``map``), training (``train``)
and the run-level fit job (``job``)."""
from somprobe.som.grid import TOPOLOGIES, Grid
from somprobe.som.map import CURVE_COLUMNS, INITS, METRICS, MODES, SOM

__all__ = ["Grid", "TOPOLOGIES", "SOM", "METRICS", "INITS", "MODES", "CURVE_COLUMNS", "fit_run",
           "parse_sizes"]


def __getattr__(name):
    # The job imports the code store lazily so ``import somprobe.som`` stays light.
    if name in ("fit_run", "parse_sizes"):
        from somprobe.som import job

        return getattr(job, name)
    raise AttributeError(name)
