"""Reporting: results.json, plots and the printed summary."""

from jaxrep.report.plots import (mean_matrix, pair_distances, plot_trajectory,
                                 write_plots)
from jaxrep.report.results import results_dict, versions, write_json_atomic
from jaxrep.report.summary import summary_table
