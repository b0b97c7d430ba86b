"""The layout of a run directory: every path of a run comes from here.

::

    runs/<name>/
      model/            checkpoint.pt, meta.json
      codes/<split>/    <layer>.npy, labels.npy, preds.npy, ids.json, manifest.json
      soms/             <layer>-<m>x<n>.pt + .json, curves.csv, bmus/<split>/<layer>-<m>x<n>.npy
      attacks/<name>/   images.npy, ids.json, labels.npy, summary.json
      decoders/         <layer>.pt + <layer>.json card
      paths/<name>/     pairs.csv, paths.csv, points/, table1.csv
      geometry/         curvature.csv, subspace.npz, projections.csv
      detect/           features/, scores.csv
      analysis/         *.csv, figures/*.png
      report.html, commands.txt
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Run", "atomic_output", "atomic_path", "atomic_write_bytes", "atomic_write_json",
           "save_npy", "save_csv", "som_key"]

_NAME = re.compile(r"^[A-Za-z0-9_.:+-]+$")


def _check_name(kind: str, name: str) -> str:
    if not name or not _NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"invalid {kind} name {name!r}: use letters, digits and '_.:+-' only"
        )
    return name


def som_key(layer: str, m: int, n: int) -> str:
    """File stem of the SOM of ``layer`` on an ``m``×``n`` grid, e.g. ``CL1-20x20``."""
    return f"{_safe(layer)}-{int(m)}x{int(n)}"


def _safe(layer: str) -> str:
    # ``module:layer1.0`` must become a plain file name on every OS.
    return layer.replace(":", "_").replace("/", "_")


@dataclass(frozen=True)
class Run:
    """Paths of one run directory. Creating a ``Run`` touches nothing on disk."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # model -----------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / "checkpoint.pt"

    @property
    def model_meta(self) -> Path:
        return self.model_dir / "meta.json"

    # codes -----------------------------------------------------------------
    @property
    def codes_root(self) -> Path:
        return self.root / "codes"

    def codes_dir(self, split: str) -> Path:
        return self.codes_root / _check_name("split", split)

    def splits(self) -> list[str]:
        """Splits with a completed code store (a manifest), sorted by name."""
        if not self.codes_root.is_dir():
            return []
        return sorted(p.name for p in self.codes_root.iterdir() if (p / "manifest.json").is_file())

    # soms ------------------------------------------------------------------
    @property
    def soms_dir(self) -> Path:
        return self.root / "soms"

    def som_path(self, layer: str, m: int, n: int) -> Path:
        return self.soms_dir / f"{som_key(layer, m, n)}.pt"

    def som_meta(self, layer: str, m: int, n: int) -> Path:
        return self.soms_dir / f"{som_key(layer, m, n)}.json"

    @property
    def curves_csv(self) -> Path:
        return self.soms_dir / "curves.csv"

    def bmus_path(self, split: str, layer: str, m: int, n: int) -> Path:
        return self.soms_dir / "bmus" / _check_name("split", split) / f"{som_key(layer, m, n)}.npy"

    # attacks ---------------------------------------------------------------
    def attack_dir(self, name: str) -> Path:
        return self.root / "attacks" / _check_name("attack", name)

    # decoders, paths, geometry, detection ----------------------------------
    @property
    def decoders_dir(self) -> Path:
        return self.root / "decoders"

    def decoder_path(self, layer: str) -> Path:
        """Weights of the decoder from ``layer``'s latent to the image (plain tensors)."""
        return self.decoders_dir / f"{_safe(layer)}.pt"

    def decoder_card(self, layer: str) -> Path:
        """JSON card of a decoder: architecture, training, val MSE, PSNR, class kept."""
        return self.decoders_dir / f"{_safe(layer)}.json"

    def decoder_state(self, layer: str) -> Path:
        """Per-epoch training checkpoint of a decoder (``--resume``); removed once it is done."""
        return self.decoders_dir / f"{_safe(layer)}.state.pt"

    def decoder_samples(self, layer: str) -> Path:
        """A few val images and their reconstructions (``.npz``) for the decoders figure."""
        return self.decoders_dir / f"{_safe(layer)}-samples.npz"

    @property
    def decoder_cards_csv(self) -> Path:
        """One row per decoder card (the report's Decoders table)."""
        return self.decoders_dir / "cards.csv"

    @property
    def paths_root(self) -> Path:
        return self.root / "paths"

    def paths_dir(self, name: str) -> Path:
        """One ``somprobe connect`` experiment: pairs.csv, paths.csv, points/, table1.csv."""
        return self.paths_root / _check_name("paths", name)

    @property
    def geometry_dir(self) -> Path:
        return self.root / "geometry"

    @property
    def detect_dir(self) -> Path:
        return self.root / "detect"

    # analysis --------------------------------------------------------------
    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def table(self, name: str) -> Path:
        return self.analysis_dir / f"{_check_name('table', name)}.csv"

    def weight_distances_path(self, layer: str, m: int, n: int) -> Path:
        """float32 G×G cosine distances between the unit weights of one SOM (``.npy``)."""
        return self.analysis_dir / "weight_distances" / f"{som_key(layer, m, n)}.npy"

    @property
    def figures_dir(self) -> Path:
        return self.analysis_dir / "figures"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{_check_name('figure', name)}.png"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def commands_log(self) -> Path:
        """One line per somprobe command that wrote into this run (shown in the report)."""
        return self.root / "commands.txt"


def atomic_path(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` to write to before ``os.replace``.

    Writing next to the target keeps the rename on one file system, so readers see either the
    old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    ::

        with atomic_output(run.checkpoint) as tmp:
            torch.save(state, tmp)
    """
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_npy(path: str | os.PathLike, array) -> None:
    """``np.save`` to ``path`` atomically (``np.save`` on a name would append ``.npy`` to the temp name)."""
    import numpy as np

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV to ``path`` atomically, without its index."""
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
