"""Paths between inputs of one class, in pixel space or in any latent (studies 000, 001).

Pure tensor modules, batched over pairs and path points, no I/O:
:mod:`.spaces` (where a path lives), :mod:`.core` (the :class:`PathBatch` result, dense checks,
linear profiles), :mod:`.pairs` (which inputs to join), :mod:`.linear`, :mod:`.neb`, :mod:`.barrier` and
:mod:`.regions` (studies 000 and 002, with :mod:`.optimise`, :mod:`.anchors`, :mod:`.synthetic`),
:mod:`.convexity`; the run-level job and the method registry in :mod:`.job` (``somprobe connect``).
"""
from __future__ import annotations

from .core import PathBatch, check_paths, evaluate, linear_profile, path_profile
from .linear import find_linear
from .neb import find_neb, improved_tangent, redistribute
from .pairs import adversarial_pairs, pair_id, pairs_from_table, same_class_pairs
from .spaces import Space, make_space
# decoders (helper split-decoders): pure model code; the run job is somprobe.paths.decoder_job
from .decoders import Decoder, build_decoder, decode, fit_linear_decoder
# barrier bypass (study 000), region paths and convexity (study 002), issue 10
from .barrier import find_barrier
from .convexity import convexity_summary, convexity_test
from .optimise import class_optimal_inputs, minimise_loss
from .regions import find_region_path, project_to_class

__all__ = [
    "Space", "make_space", "PathBatch", "check_paths", "evaluate", "linear_profile",
    "path_profile", "find_linear", "find_neb", "improved_tangent", "redistribute",
    "same_class_pairs", "adversarial_pairs", "pairs_from_table", "pair_id",
    "Decoder", "build_decoder", "decode", "fit_linear_decoder",
    "find_barrier", "find_region_path", "project_to_class", "convexity_test", "convexity_summary",
    "minimise_loss", "class_optimal_inputs",
]
