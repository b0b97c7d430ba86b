"""The code store: one directory per split holding the vector codes of every probed layer.

::

    codes/<split>/
      <layer>.npy      float32 [N, D_layer]   (``module:a.b`` → ``module_a.b.npy``)
      labels.npy       int64 [N]
      preds.npy        int64 [N]
      ids.json         list of N sample ids
      manifest.json    parameters, dims, package versions, rows_completed, complete

Rows are written batch by batch: each batch maps only its own rows of the ``.npy`` files
(``numpy.memmap`` with an offset), writes, flushes and unmaps them, so memory does not grow with
N. After every batch the manifest is replaced atomically with the new ``rows_completed``; a crash
therefore leaves a store whose manifest says how far it got, and ``resume=True`` continues from
there. Readers refuse a store whose manifest is not ``complete``.

Under ``torchrun`` (several ranks, issue 12) rank 0 creates the files and the manifest, every
rank maps and writes only the rows of its own shard (disjoint row ranges) and records what it has
written in ``progress-rank<R>.json`` (``done``: row intervals, ``status``: running / done /
failed) instead of the shared manifest. Rows done = ``[0, rows_completed)`` of the manifest ∪
every progress file's intervals (:func:`done_intervals`), whatever the number of ranks that wrote
them, so a resumed run may use another world size. Rank 0 marks the manifest complete only after
every rank reported done and the intervals cover every row; then the progress files go.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import StoreError
from .run import _json_default, _safe, atomic_write_json

__all__ = ["CodeStore", "StoreWriter", "open_store", "layer_file", "package_versions", "FORMAT_VERSION",
           "done_intervals", "progress_files", "read_progress"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids.json"
LABELS = "labels.npy"
PREDS = "preds.npy"
PROGRESS_GLOB = "progress-rank*.json"
# float16 halves the disk of large stores (manifest "dtype"; absent = float32); readers widen
CODE_DTYPES = ("float32", "float16")
# Fields that legitimately change between the first attempt and a resumed one.
_VOLATILE = {"rows_completed", "complete", "created", "updated", "versions", "elapsed_s"}
_CHUNK_BYTES = 16 << 20


def layer_file(layer: str) -> str:
    """File name of a layer's codes (``CL1.npy``, ``module_layer1.0.npy``)."""
    return f"{_safe(layer)}.npy"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the codes (recorded in manifests)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("somprobe", "torch", "timm", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _ids_digest(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    try:
        return json.loads(mpath.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"corrupt manifest {mpath}: {e}; re-run `somprobe extract --overwrite`") from e


def progress_file(path: str | os.PathLike, rank: int) -> Path:
    """Rank ``rank``'s progress record in the store directory ``path``."""
    return Path(path) / f"progress-rank{int(rank)}.json"


def progress_files(path: str | os.PathLike) -> list[Path]:
    """Every per-rank progress record of the store at ``path`` (sorted)."""
    return sorted(Path(path).glob(PROGRESS_GLOB))


def read_progress(path: str | os.PathLike) -> dict[int, dict]:
    """rank → progress record (``done`` intervals, ``status``, ``error``, ``updated``)."""
    out = {}
    for p in progress_files(path):
        try:
            rec = json.loads(p.read_text())
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"corrupt progress record {p}: {e}; pass --overwrite to start again") from e
    return out


def merge_intervals(intervals) -> list[list[int]]:
    """Sorted, merged ``[start, stop)`` intervals."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if int(b) > int(a)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def done_intervals(path: str | os.PathLike) -> list[list[int]]:
    """Rows already written to the (incomplete) store at ``path``, as merged intervals.

    ``[0, rows_completed)`` of the manifest (one-process writing) ∪ every rank's progress record.
    Empty when there is no store yet.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return []
    rows = int(_read_manifest(path).get("rows_completed", 0))
    got = [[0, rows]] if rows > 0 else []
    for rec in read_progress(path).values():
        got += rec.get("done", [])
    return merge_intervals(got)


def _header_offset(path: Path) -> int:
    mm = np.lib.format.open_memmap(path, mode="r")
    try:
        return int(mm.offset)
    finally:
        del mm


class StoreWriter:
    """Streams rows into a code store; resumable; manifest replaced atomically after each batch.

    Parameters
    ----------
    path : path
        The split's directory (``Run.codes_dir(split)``).
    layers_dims : mapping layer → D
        Code width per layer (in layer order).
    n_rows : int
        Total number of samples N.
    manifest : dict
        Parameters of the extraction (model, checkpoint_sha256, stats, com, dataset, split,
        per_class, seed, image_size, ...). On resume they must equal the stored ones.
    ids : sequence of str
        The N sample ids, in row order (written to ``ids.json``; checked on resume).
    resume : bool
        Continue an incomplete store with the same parameters.
    overwrite : bool
        Replace an existing store (complete or not).

    Raises
    ------
    StoreError
        The directory holds a store and neither ``resume`` nor ``overwrite`` allows going on, or
        the parameters of a resumed store differ.
    """

    def __init__(self, path: str | os.PathLike, *, layers_dims: Mapping[str, int], n_rows: int,
                 manifest: Mapping, ids: Sequence[str], resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.layers_dims = {str(k): int(v) for k, v in layers_dims.items()}
        self.n_rows = int(n_rows)
        ids = [str(i) for i in ids]
        if self.n_rows <= 0:
            raise StoreError(f"nothing to write to {self.path}: 0 samples selected; check --per-class / the split")
        if len(ids) != self.n_rows:
            raise StoreError(f"{len(ids)} ids for {self.n_rows} rows in {self.path}")
        if len(set(ids)) != len(ids):
            raise StoreError(f"sample ids for {self.path} are not unique; every sample needs its own id")
        files = {layer: layer_file(layer) for layer in self.layers_dims}
        if len(set(files.values())) != len(files):
            raise StoreError(f"layer names {list(files)} map to the same file name; rename the probes")
        self._params = dict(manifest)
        if str(self._params.get("dtype", "float32")) not in CODE_DTYPES:
            raise StoreError(f"code dtype {self._params['dtype']!r} is not one of {', '.join(CODE_DTYPES)}")
        self._params.update({
            "format_version": FORMAT_VERSION,
            "layers": list(self.layers_dims),
            "dims": dict(self.layers_dims),
            "files": files,
            "n_rows": self.n_rows,
            "ids_sha256": _ids_digest(ids),
        })
        # through JSON once, so tuples/numpy scalars compare equal to what a resumed run reads back
        self._params = json.loads(json.dumps(self._params, default=_json_default))
        self._offsets: dict[str, int] = {}
        self._t0 = time.time()
        self.rows_done = 0

        existing = self.path / MANIFEST
        if existing.is_file() or self._has_store_files():
            if overwrite:
                self._remove_old()
            elif resume and existing.is_file():
                self._resume()
                return
            else:
                old = _read_manifest(self.path) if existing.is_file() else {}
                if old.get("complete"):
                    raise StoreError(f"{self.path} already holds a complete code store; pass --overwrite "
                                     "to replace it or choose another --out")
                done = old.get("rows_completed", 0)
                raise StoreError(f"{self.path} holds an incomplete code store ({done} of "
                                 f"{old.get('n_rows', '?')} rows); pass --resume to continue it or "
                                 "--overwrite to start again")
        self._create(ids)

    # -- setup ------------------------------------------------------------------------------
    def _store_files(self) -> list[Path]:
        names = {MANIFEST, IDS, LABELS, PREDS, *(layer_file(l) for l in self.layers_dims),
                 *(p.name for p in progress_files(self.path))}
        if (self.path / MANIFEST).is_file():
            try:
                names.update(_read_manifest(self.path).get("files", {}).values())
            except StoreError:
                pass
        return [self.path / n for n in sorted(names)]

    def _has_store_files(self) -> bool:
        return any(p.exists() for p in self._store_files())

    def _remove_old(self) -> None:
        # only the store's own files: --out may be a directory the user keeps other things in
        for p in self._store_files():
            p.unlink(missing_ok=True)

    def _arrays(self) -> dict[str, tuple[Path, np.dtype, tuple]]:
        code_dtype = np.dtype(self._params.get("dtype", "float32"))
        out = {layer: (self.path / layer_file(layer), code_dtype, (self.n_rows, d))
               for layer, d in self.layers_dims.items()}
        out[LABELS] = (self.path / LABELS, np.dtype(np.int64), (self.n_rows,))
        out[PREDS] = (self.path / PREDS, np.dtype(np.int64), (self.n_rows,))
        return out

    def _create(self, ids: list[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / IDS, ids)
        for key, (p, dtype, shape) in self._arrays().items():
            # writes the header and sizes the (sparse) file; rows are filled in later
            mm = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)
            del mm
            self._offsets[key] = _header_offset(p)
        self._params["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_manifest(complete=False)

    def _resume(self) -> None:
        old = _read_manifest(self.path)
        if old.get("complete"):
            raise StoreError(f"{self.path} already holds a complete code store; nothing to resume "
                             "(pass --overwrite to extract again)")
        diffs = [k for k in sorted(set(old) | set(self._params))
                 if k not in _VOLATILE and old.get(k) != self._params.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: stored {old.get(k)!r} vs now {self._params.get(k)!r}" for k in diffs[:5])
            raise StoreError(f"cannot resume {self.path}: parameters differ ({detail}); run with the "
                             "same parameters or pass --overwrite to start again")
        for key, (p, dtype, shape) in self._arrays().items():
            try:
                arr = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise StoreError(f"cannot resume: {p} is missing or unreadable ({e}); pass --overwrite") from e
            if arr.shape != shape or arr.dtype != dtype:
                raise StoreError(f"cannot resume: {p} has shape {arr.shape} {arr.dtype}, expected "
                                 f"{shape} {dtype}; pass --overwrite")
            del arr
            self._offsets[key] = _header_offset(p)
        self._params["created"] = old.get("created")
        self.rows_done = int(old.get("rows_completed", 0))

    def _write_manifest(self, *, complete: bool) -> None:
        m = dict(self._params)
        m.update({
            "rows_completed": self.rows_done,
            "complete": complete,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": package_versions(),
        })
        atomic_write_json(self.path / MANIFEST, m)

    # -- writing ----------------------------------------------------------------------------
    def _put(self, key: str, start: int, arr: np.ndarray) -> None:
        p, dtype, shape = self._arrays()[key]
        if dtype == np.float16 and np.abs(arr).max(initial=0) > np.finfo(np.float16).max:
            raise StoreError(f"codes of {key} exceed float16's range (±65504): extract with "
                             "--dtype float32")
        arr = np.asarray(arr, dtype=dtype)
        if arr.shape[1:] != shape[1:]:
            raise StoreError(f"{key}: rows of shape {arr.shape[1:]} do not fit {p.name} of width {shape[1:]}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        # map only this batch's rows so the process never holds the whole file
        mm = np.memmap(p, dtype=dtype, mode="r+", offset=self._offsets[key] + start * row_bytes,
                       shape=arr.shape)
        mm[...] = arr
        mm.flush()
        del mm

    def write(self, start: int, codes: Mapping[str, np.ndarray], labels, preds) -> None:
        """Write rows ``start … start+B-1`` of every layer, then record them in the manifest.

        Rows must arrive in order: ``start`` equals :attr:`rows_done`.
        """
        if start != self.rows_done:
            raise StoreError(f"rows must be written in order: next row is {self.rows_done}, got {start}")
        if start + len(labels) > self.n_rows:
            raise StoreError(f"writing rows {start}..{start + len(labels) - 1} past the end "
                             f"({self.n_rows} rows)")
        self.put_rows(start, codes, labels, preds)
        self.rows_done = start + len(labels)
        self._write_manifest(complete=False)

    # -- several ranks (issue 12) ---------------------------------------------------------
    @classmethod
    def attach(cls, path: str | os.PathLike, *, manifest: Mapping, ids: Sequence[str]) -> "StoreWriter":
        """Open the incomplete store another rank created at ``path`` for writing rows.

        Layers and widths come from the stored manifest; ``manifest`` (this rank's parameters)
        and ``ids`` must equal the stored ones, so every rank is seen to extract the same thing.
        """
        path = Path(path)
        try:
            old = _read_manifest(path)
        except FileNotFoundError:
            raise StoreError(f"no code store at {path} after rank 0 created it: the directory is "
                             "not shared between ranks; put --out on a shared filesystem") from None
        dims = {layer: int(old["dims"][layer]) for layer in old.get("layers", [])}
        params = {k: v for k, v in manifest.items()}
        return cls(path, layers_dims=dims, n_rows=int(old.get("n_rows", 0)), manifest=params,
                   ids=ids, resume=True)

    def put_rows(self, start: int, codes: Mapping[str, np.ndarray], labels, preds) -> None:
        """Write rows ``start … start+B-1`` in any order, without touching the manifest (each
        rank records them with :meth:`record_progress`)."""
        labels = np.asarray(labels)
        b = len(labels)
        if start < 0 or start + b > self.n_rows:
            raise StoreError(f"writing rows {start}..{start + b - 1} outside 0..{self.n_rows - 1}")
        if set(codes) != set(self.layers_dims):
            raise StoreError(f"batch has layers {sorted(codes)}, store expects {list(self.layers_dims)}")
        for layer, arr in codes.items():
            if len(arr) != b:
                raise StoreError(f"layer {layer}: {len(arr)} rows for a batch of {b}")
            self._put(layer, start, arr)
        self._put(LABELS, start, labels)
        self._put(PREDS, start, np.asarray(preds))

    def record_progress(self, rank: int, done, *, status: str = "running", error: str | None = None,
                        **extra) -> None:
        """Replace rank ``rank``'s progress record: rows ``done`` (intervals), ``status``."""
        atomic_write_json(progress_file(self.path, rank), {
            "rank": int(rank), "done": merge_intervals(done), "status": status, "error": error,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra})

    def finish_sharded(self) -> "CodeStore":
        """Rank 0, after every rank reported done: check every row is written, mark the store
        complete, drop the progress records."""
        done = done_intervals(self.path)
        if done != [[0, self.n_rows]]:
            missing = self.n_rows - sum(b - a for a, b in done)
            raise StoreError(f"{self.path}: {missing} of {self.n_rows} rows were not written by any "
                             "rank; the store stays incomplete (re-run with --resume)")
        self.rows_done = self.n_rows
        store = self.close()
        for p in progress_files(self.path):
            p.unlink(missing_ok=True)
        return store

    def close(self) -> "CodeStore":
        """Mark the store complete (all rows written) and return it opened for reading."""
        if self.rows_done != self.n_rows:
            raise StoreError(f"{self.path}: only {self.rows_done} of {self.n_rows} rows written; "
                             "the store stays incomplete (resume with --resume)")
        self._params["elapsed_s"] = round(time.time() - self._t0, 3)
        self._write_manifest(complete=True)
        return CodeStore(self.path)


class CodeStore:
    """Read access to a complete code store, with validation that names the bad file.

    Parameters
    ----------
    path : path
        The split's directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            if not self.path.exists():
                raise StoreError(f"no code store at {self.path}: run `somprobe extract` first "
                                 "(it writes runs/<name>/codes/<split>/)")
            raise StoreError(f"{self.path} has no {MANIFEST}: it is not a code store; run "
                             "`somprobe extract` (with --overwrite if the directory is in use)")
        self.manifest: dict = _read_manifest(self.path)
        if not self.manifest.get("complete"):
            try:  # rows of every rank (issue 12), not only the manifest's one-process count
                done = sum(b - a for a, b in done_intervals(self.path))
            except StoreError:
                done = self.manifest.get("rows_completed", 0)
            raise StoreError(f"code store {self.path} is incomplete ({done} "
                             f"of {self.manifest.get('n_rows', '?')} rows): finish it with "
                             "`somprobe extract --resume` (same options) or redo it with --overwrite")
        for key in ("layers", "dims", "n_rows", "files"):
            if key not in self.manifest:
                raise StoreError(f"{self.path / MANIFEST} lacks {key!r}; re-run `somprobe extract --overwrite`")
        self._checked: set[str] = set()

    # -- metadata ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.manifest["dims"].items()}

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def split(self) -> str | None:
        return self.manifest.get("split")

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"CodeStore({str(self.path)!r}, n_rows={self.n_rows}, layers={self.layers})"

    # -- arrays -----------------------------------------------------------------------------
    def _load(self, p: Path, dtype, shape, mmap: bool) -> np.ndarray:
        if not p.is_file():
            raise StoreError(f"missing file {p}: the store is damaged; re-run `somprobe extract --overwrite`")
        try:
            arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise StoreError(f"cannot read {p}: {e}; re-run `somprobe extract --overwrite`") from e
        if arr.dtype != dtype:
            raise StoreError(f"{p} has dtype {arr.dtype}, expected {np.dtype(dtype)}; "
                             "re-run `somprobe extract --overwrite`")
        if arr.shape != shape:
            raise StoreError(f"{p} has shape {arr.shape}, expected {shape} (from {MANIFEST}); "
                             "re-run `somprobe extract --overwrite`")
        return arr

    def _check_finite(self, p: Path, arr: np.ndarray) -> None:
        if str(p) in self._checked:
            return
        n, width = len(arr), int(np.prod(arr.shape[1:], dtype=np.int64))
        step = max(1, _CHUNK_BYTES // max(1, width * arr.dtype.itemsize))
        # plain chunked reads, not the memory map: pages touched through a map stay resident,
        # so checking a large store through it would hold the whole file in RSS
        with open(p, "rb") as f:
            f.seek(_header_offset(p))
            for s in range(0, n, step):
                rows = min(step, n - s)
                block = np.fromfile(f, dtype=arr.dtype, count=rows * width).reshape(rows, width)
                ok = np.isfinite(block).all(axis=1)
                if not ok.all():
                    bad = s + int(np.flatnonzero(~ok)[0])
                    raise StoreError(f"{p} holds non-finite values (first at row {bad}, id "
                                     f"{self.ids[bad]!r}); re-run `somprobe extract --overwrite`")
        self._checked.add(str(p))

    def codes(self, layer: str, mmap: bool = True, *, widen: bool = True) -> np.ndarray:
        """Codes of one layer, float32 [N, D], validated (shape, dtype, finiteness).

        Parameters
        ----------
        layer : str
        mmap : bool
            Memory-map the file read-only instead of loading it (default).
        widen : bool
            For a store extracted with ``dtype="float16"``: return float32 (loaded in memory,
            the default) or the float16 memory map as it is (``widen=False``; the SOM reads it
            chunk by chunk as float32). float32 stores ignore it.
        """
        if layer not in self.manifest["dims"]:
            raise StoreError(f"layer {layer!r} is not in {self.path}; stored layers: {', '.join(self.layers)}; "
                             "extract it with `somprobe extract --layers ...`")
        p = self.path / self.manifest["files"][layer]
        dtype = np.dtype(self.manifest.get("dtype", "float32"))
        arr = self._load(p, dtype, (self.n_rows, int(self.manifest["dims"][layer])), mmap)
        self._check_finite(p, arr)
        if dtype != np.float32 and widen:
            return np.asarray(arr, dtype=np.float32)
        return arr

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._load(self.path / LABELS, np.int64, (self.n_rows,), False))

    @property
    def preds(self) -> np.ndarray:
        return np.asarray(self._load(self.path / PREDS, np.int64, (self.n_rows,), False))

    @property
    def ids(self) -> list[str]:
        if not hasattr(self, "_ids"):
            p = self.path / IDS
            try:
                ids = json.loads(p.read_text())
            except FileNotFoundError:
                raise StoreError(f"missing file {p}: re-run `somprobe extract --overwrite`") from None
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"cannot read {p}: {e}; re-run `somprobe extract --overwrite`") from e
            if not isinstance(ids, list) or len(ids) != self.n_rows:
                raise StoreError(f"{p} holds {len(ids) if isinstance(ids, list) else 'no list of'} ids, "
                                 f"expected {self.n_rows}; re-run `somprobe extract --overwrite`")
            self._ids = [str(i) for i in ids]
        return self._ids

    def validate(self) -> "CodeStore":
        """Check every file (shapes, dtypes, finiteness, id count); raise StoreError naming the bad one."""
        self.ids  # noqa: B018 (validates ids.json)
        self.labels  # noqa: B018
        self.preds  # noqa: B018
        for layer in self.layers:
            self.codes(layer, mmap=True)
        return self


def open_store(path: str | os.PathLike, *, validate: bool = False) -> CodeStore:
    """Open a complete code store.

    Parameters
    ----------
    path : path
        The split's directory (``Run.codes_dir(split)``).
    validate : bool
        Check every file now rather than on first access.

    Raises
    ------
    StoreError
        Missing directory (says to run ``somprobe extract``), incomplete store (says
        ``--resume``), or a damaged file (named).
    """
    store = CodeStore(path)
    return store.validate() if validate else store
