"""Sweeps: one command runs a grid of scenarios x seeds, resumably, and
aggregates them over seeds (`python -m jaxrep.sweep`)."""

from jaxrep.sweep.grid import Cell, Spec, parse_grid, parse_seeds
from jaxrep.sweep.run import Datasets, check, record, run_cells, write_tables
from jaxrep.sweep.table import FIGURES, aggregate, interval

__all__ = ["Cell", "Spec", "parse_grid", "parse_seeds", "Datasets", "check",
           "record", "run_cells", "write_tables", "FIGURES", "aggregate",
           "interval"]
