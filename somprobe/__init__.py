"""somprobe: look inside trained vision networks with self-organizing maps on a torus.

The main entry points, importable from the top level (loaded on first use, so ``somprobe --help``
stays fast)::

    from somprobe import Run, load_dataset, som_splits, train_classifier, load_trained, build_model
    from somprobe import SOM, Grid, fit_run, analyze_run, shift_run
    from somprobe.extract import extract
    from somprobe import pgd, fgsm, uniform_noise, attack_run, plot_run, write_report, run_demo
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Run": "run",
    "load_dataset": "data", "som_splits": "data", "balanced_indices": "data",
    "build_model": "models", "probe_names": "models", "parse_layers": "models",
    "ProbedModel": "models", "split_model": "models",
    "vector_code": "codes",
    "open_store": "store", "CodeStore": "store",
    "extract_images": "extract",  # `extract` itself: somprobe.extract.extract (the name is the module)
    "train_classifier": "classifier", "load_trained": "classifier",
    "SOM": "som.map", "Grid": "som.grid", "fit_run": "som.job",
    "analyze_run": "analysis.job", "shift_run": "analysis.job",
    "pgd": "attacks", "fgsm": "attacks", "uniform_noise": "attacks",
    "attack_run": "attacks.job",
    "plot_run": "plots", "write_report": "report",
    "run_demo": "pipeline",
    "train_decoders": "paths.decoder_job", "load_decoder": "paths.decoder_job",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'somprobe' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
