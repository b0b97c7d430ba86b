"""Study-003 analyses of fitted SOMs: tables only (pandas), no plotting.

All grid geometry comes from :class:`somprobe.som.grid.Grid`.
"""
from .centres import CENTRE_METHODS, class_centres, class_means, correct_vs_incorrect, d_class
from .density import bmu_density, class_bmu_counts, density_points, scott_bandwidth
from .job import TABLE_COLUMNS, analyze_run, find_soms, shift_run, write_table
from .shifts import align_ids, bmu_shifts, shift_summary, shift_table
from .similarity import centre_similarity, choose_classes, weight_cosine_distances, weight_similarity_summary

__all__ = [
    "CENTRE_METHODS", "class_centres", "class_means", "correct_vs_incorrect", "d_class",
    "bmu_density", "class_bmu_counts", "density_points", "scott_bandwidth",
    "TABLE_COLUMNS", "analyze_run", "find_soms", "shift_run", "write_table",
    "align_ids", "bmu_shifts", "shift_summary", "shift_table",
    "centre_similarity", "choose_classes", "weight_cosine_distances", "weight_similarity_summary",
]
