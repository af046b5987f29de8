"""Hydra only instantiates sweepers that live under the `hydra_plugins` namespace package; the
implementation is pipeline.sweep.GridSweeper and this module only registers it."""
from pipeline.sweep import GridSweeper as _GridSweeper


class GridSweeper(_GridSweeper):
    """The union-of-grids sweeper (see pipeline/sweep.py)."""
