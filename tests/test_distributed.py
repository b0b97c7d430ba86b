"""Sharded extraction and attacks over 2 gloo ranks on the CPU (issue 12), against one process.

Ranks are real processes: library calls in ``spawn``-ed workers (each sets torchrun's
environment and calls ``somprobe.distributed.init``), and the CLI under
``python -m torch.distributed.run``. Everything runs on tiny ``test_resnet`` models and real
sklearn digits; the whole file takes well under 90 s on 2 cores.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

from somprobe import distributed as dist
from somprobe.errors import DistributedError, StoreError
from somprobe.extract import _pieces
from somprobe.store import done_intervals, merge_intervals, open_store

torch.set_num_threads(1)
IMAGE = 16
N_PER_CLASS = 3  # 30 digits: 4 batches of 8, rank 0 rows 0-15, rank 1 rows 16-29
BATCH = 8
EPS = 8 / 255


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------
def test_batch_shard_is_batch_aligned_and_covers_every_row():
    for n, bs, world in [(30, 8, 2), (30, 8, 3), (5, 8, 2), (1, 4, 3), (64, 8, 4), (0, 8, 2)]:
        shards = [dist.batch_shard(n, bs, r, world) for r in range(world)]
        rows = [i for s in shards for i in s]
        assert rows == list(range(n))  # disjoint, contiguous, in rank order
        assert all(s.start % bs == 0 for s in shards if len(s))
    assert [len(dist.batch_shard(30, 8, r, 2)) for r in range(2)] == [16, 14]
    assert [len(dist.batch_shard(1, 8, r, 2)) for r in range(2)] == [1, 0]  # world > samples
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        dist.batch_shard(10, 4, 2, 2)


def test_pieces_are_global_batches_minus_done_rows():
    mine = range(16, 30)
    assert _pieces(mine, 8, []) == [(16, 24), (24, 30)]
    assert _pieces(mine, 8, [[0, 24]]) == [(24, 30)]
    assert _pieces(mine, 8, [[18, 20], [26, 27]]) == [(16, 18), (20, 24), (24, 26), (27, 30)]
    assert _pieces(range(0, 0), 8, []) == []
    assert merge_intervals([[5, 7], [0, 2], [2, 4], [6, 9], [3, 3]]) == [[0, 4], [5, 9]]


def test_one_process_collectives_degrade_to_local_calls(tmp_path):
    assert dist.all_gather_object(3) == [3] and dist.broadcast_object("x") == "x"
    dist.agree(None)
    with pytest.raises(DistributedError, match="boom"):
        dist.agree("boom")
    assert dist.on_main(lambda: 7) == 7
    dist.check_shared_dir(tmp_path)  # nothing to check in one process, nothing written
    assert list(tmp_path.iterdir()) == []
    assert dist.check_devices("cpu") == "cpu"


# ---------------------------------------------------------------------------------------------
# helpers: 2 spawned ranks calling library functions
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _setup():
    from somprobe.data import balanced_indices, load_dataset
    from somprobe.models import build_model

    ds = load_dataset("digits", split="train", image_size=IMAGE)
    model = build_model("test_resnet", image_size=IMAGE, seed=0)  # as the CLI builds it
    return model, ds, balanced_indices(ds.labels, N_PER_CLASS, seed=0)


class _Dying:
    """The dataset, but rank ``rank`` fails (``mode="raise"``) or is killed (``"kill"``) at its
    ``at``-th batch."""

    def __init__(self, ds, rank, at, mode):
        self.ds, self.rank, self.at, self.mode, self.calls = ds, rank, at, mode, 0
        self.labels, self.ids, self.name, self.split = ds.labels, ds.ids, ds.name, ds.split

    def images(self, indices, size=None):
        self.calls += 1
        if dist.context().rank == self.rank and self.calls >= self.at:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError("disk on fire")
        return self.ds.images(indices, size)


CLI_EXTRACT = ["extract", "--model", "test_resnet", "--data", "digits", "--split", "train",
               "--per-class", str(N_PER_CLASS), "--image-size", str(IMAGE), "--batch-size", str(BATCH),
               "--device", "cpu", "--quiet"]
META = {}  # the extra manifest entries the CLI records (filled by ``reference``, sent to workers)


def _extract_kw(**kw):
    return dict(layers="all", batch_size=BATCH, device="cpu", seed=0, per_class=N_PER_CLASS,
                meta=META, **kw)


def _worker(rank, world, port, scenario, tmp, meta):
    META.update(meta)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="localhost", MASTER_PORT=str(port), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = "ok"
        except DistributedError as e:
            out[key] = f"DistributedError: {e}"
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[key] = f"{type(e).__name__}: {e}"

    try:
        dist.init("cpu", timeout_s=60)
        from somprobe.attacks.job import attack_run
        from somprobe.extract import extract
        from somprobe.run import Run

        model, ds, idx = _setup()
        run = Run(os.path.join(tmp, "run"))
        if scenario == "main":
            attempt("extract", lambda: extract(model, ds, idx, out=run, split="som-tr", **_extract_kw()))
            attempt("attack", lambda: attack_run(run, model=model, dataset=ds, source_split="som-tr",
                                                 eps=EPS, steps=2, seed=3, batch_size=BATCH,
                                                 device="cpu"))
            attempt("noise", lambda: attack_run(run, model=model, dataset=ds, source_split="som-tr",
                                                attack="noise", eps=EPS, seed=3, batch_size=BATCH,
                                                device="cpu", extract=False))
            # world size larger than the number of samples: rank 1's shard is empty
            attempt("tiny", lambda: extract(model, ds, idx[:1], out=run, split="tiny", **_extract_kw()))
            # a rank that fails: the others stop with a message naming it
            attempt("failing", lambda: extract(model, _Dying(ds, 1, 2, "raise"), idx, out=run,
                                               split="failing", **_extract_kw()))
            # a run directory not shared: rank 1 looks at another directory
            attempt("shared", lambda: dist.check_shared_dir(os.path.join(tmp, f"dir{rank}")))
            # mixed devices: rank 1 claims a GPU
            if rank == 1:
                import somprobe.device

                somprobe.device.resolve_device = lambda device: torch.device("cuda")
            attempt("devices", lambda: dist.check_devices("auto"))
        elif scenario == "kill":
            attempt("extract", lambda: extract(model, _Dying(ds, 1, 2, "kill"), idx, out=run,
                                               split="som-tr", **_extract_kw()))
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()
    with open(os.path.join(tmp, f"{scenario}-rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.finalize()


def _launch(scenario, tmp, world=2, timeout=150):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, str(tmp), META)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank of scenario {scenario!r} hung")
    res = {}
    for r in range(world):
        path = tmp / f"{scenario}-rank{r}.json"
        res[r] = json.loads(path.read_text()) if path.is_file() else None
    return res, [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process stores (the clean one by the CLI) and attacks to compare with."""
    from click.testing import CliRunner

    from somprobe.attacks.job import attack_run
    from somprobe.cli import main
    from somprobe.extract import extract
    from somprobe.run import Run

    model, ds, idx = _setup()
    run = Run(tmp_path_factory.mktemp("one"))
    res = CliRunner().invoke(main, CLI_EXTRACT + ["--out", str(run.root)])
    assert res.exit_code == 0, res.output
    manifest = open_store(run.codes_dir("som-tr")).manifest
    META.update({k: v for k, v in manifest.items() if k.startswith("skipped")})
    attack_run(run, model=model, dataset=ds, source_split="som-tr", eps=EPS, steps=2, seed=3,
               batch_size=BATCH, device="cpu")
    attack_run(run, model=model, dataset=ds, source_split="som-tr", attack="noise", eps=EPS, seed=3,
               batch_size=BATCH, device="cpu", extract=False)
    extract(model, ds, idx[:1], out=run, split="tiny", **_extract_kw())
    return run


def _assert_same_store(a, b):
    a, b = open_store(a, validate=True), open_store(b, validate=True)
    assert a.ids == b.ids and a.layers == b.layers
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.preds, b.preds)
    for layer in a.layers:  # batch-aligned shards: every batch as in one process, bit-equal
        np.testing.assert_array_equal(a.codes(layer), b.codes(layer))
    volatile = {"created", "updated", "elapsed_s", "versions"}
    assert {k: v for k, v in a.manifest.items() if k not in volatile} == \
        {k: v for k, v in b.manifest.items() if k not in volatile}
    assert sorted(p.name for p in a.path.iterdir()) == sorted(p.name for p in b.path.iterdir())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, reference):
    tmp = tmp_path_factory.mktemp("two")
    res, codes = _launch("main", tmp)
    assert codes == [0, 0], res
    return tmp, res


# ---------------------------------------------------------------------------------------------
# sharded work equals one process
# ---------------------------------------------------------------------------------------------
def test_sharded_extract_equals_one_process(two_ranks, reference):
    tmp, res = two_ranks
    assert res[0]["extract"] == res[1]["extract"] == "ok", res
    _assert_same_store(reference.codes_dir("som-tr"), tmp / "run" / "codes" / "som-tr")


def test_sharded_attacks_equal_one_process(two_ranks, reference):
    tmp, res = two_ranks
    assert [res[r][k] for r in (0, 1) for k in ("attack", "noise")] == ["ok"] * 4, res
    for name in ("adv-pgd", "noise"):
        a, b = reference.attack_dir(name), tmp / "run" / "attacks" / name
        for f in ("images.npy", "labels.npy", "preds.npy", "clean_preds.npy"):
            np.testing.assert_array_equal(np.load(a / f), np.load(b / f))
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        for k in ("perturbed_acc", "clean_acc", "success_rate", "linf_max", "l2_mean", "n"):
            assert sa[k] == sb[k]
        assert not list(b.glob(".*partial"))
    _assert_same_store(reference.codes_dir("adv-pgd"), tmp / "run" / "codes" / "adv-pgd")


def test_world_larger_than_samples_leaves_a_rank_idle(two_ranks, reference):
    tmp, res = two_ranks
    assert res[0]["tiny"] == res[1]["tiny"] == "ok", res
    _assert_same_store(reference.codes_dir("tiny"), tmp / "run" / "codes" / "tiny")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_failing_rank_is_named_and_store_stays_incomplete(two_ranks):
    tmp, res = two_ranks
    assert res[1]["failing"] == "OSError: disk on fire"  # the rank itself keeps its own error
    assert res[0]["failing"].startswith("DistributedError: extraction into ")
    assert "failed on 1 of 2 ranks" in res[0]["failing"]
    assert "rank 1: OSError: disk on fire" in res[0]["failing"]
    assert "rank 1 (failed" in res[0]["failing"] and "--resume" in res[0]["failing"]
    path = tmp / "run" / "codes" / "failing"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is False
    progress = json.loads((path / "progress-rank1.json").read_text())
    assert progress["status"] == "failed" and progress["done"] == [[16, 24]]
    assert done_intervals(path) == [[0, 24]]
    with pytest.raises(StoreError, match=r"incomplete \(24 of 30 rows\).*--resume"):
        open_store(path)


def test_directory_not_shared_is_detected(two_ranks):
    _, res = two_ranks
    for r in (0, 1):
        msg = res[r]["shared"]
        assert msg.startswith("DistributedError: the run directory") and "not shared" in msg
        assert "rank 1 on" in msg and "rank 0 on" not in msg and "shared filesystem" not in msg[:30]


def test_mixed_devices_are_detected(two_ranks):
    _, res = two_ranks
    for r in (0, 1):
        assert res[r]["devices"] == ("DistributedError: ranks compute on different devices (cpu on "
                                     "rank 0; cuda on rank 1); every rank must use the same kind: "
                                     "pass --device cuda (GPU on every node) or --device cpu")


def test_killed_rank_named_then_torchrun_resume_completes(tmp_path, reference):
    res, codes = _launch("kill", tmp_path)
    assert codes[1] == -signal.SIGKILL and res[1] is None
    msg = res[0]["extract"]
    assert msg.startswith("DistributedError") and "another rank stopped answering" in msg, res
    assert "Unfinished: rank 1 (running" in msg and "--resume" in msg
    store = tmp_path / "run" / "codes" / "som-tr"
    assert json.loads((store / "manifest.json").read_text())["complete"] is False
    assert done_intervals(store) == [[0, 24]]  # rank 0's shard and rank 1's first batch

    # one process may finish what two ranks started (rows 24-29 only) ...
    import shutil

    from somprobe.extract import extract

    model, ds, idx = _setup()
    copy = tmp_path / "copy" / "som-tr"
    shutil.copytree(store, copy)
    counted = _Dying(ds, rank=-1, at=0, mode="never")
    extract(model, counted, idx, out=copy, split="som-tr", resume=True, **_extract_kw())
    assert counted.calls == 1 and not list(copy.glob("progress-rank*"))
    _assert_same_store(reference.codes_dir("som-tr"), copy)

    # ... and so does the CLI under torchrun, continuing every rank's shard
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "-m", "somprobe",
           *CLI_EXTRACT, "--out", str(tmp_path / "run"), "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 alone prints the result and logs the command
    assert p.stdout.count("som-tr: 30 samples") == 1, p.stdout
    log = (tmp_path / "run" / "commands.txt").read_text().splitlines()
    assert len(log) == 1 and "--resume" in log[0]
    _assert_same_store(reference.codes_dir("som-tr"), store)


# ---------------------------------------------------------------------------------------------
# float16 storage
# ---------------------------------------------------------------------------------------------
def test_float16_store_halves_disk_and_reads_back_float32(tmp_path, reference):
    from somprobe.extract import extract

    model, ds, idx = _setup()
    half = extract(model, ds, idx, out=tmp_path / "h", split="som-tr", dtype="float16", **_extract_kw())
    full = open_store(reference.codes_dir("som-tr"))
    assert half.manifest["dtype"] == "float16" and "dtype" not in full.manifest
    for layer in full.layers:
        a, b = full.codes(layer), half.codes(layer)
        assert b.dtype == np.float32 and half.codes(layer, widen=False).dtype == np.float16
        np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))  # round to nearest
        on_disk = [(s.path / s.manifest["files"][layer]).stat().st_size for s in (full, half)]
        assert on_disk[1] < 0.51 * on_disk[0]
    np.testing.assert_array_equal(half.preds, full.preds)
    with pytest.raises(StoreError, match=r"other parameters \(dtype"):  # float16 is part of the resume check
        extract(model, ds, idx, out=tmp_path / "h", split="som-tr", resume=True, **_extract_kw())
    from somprobe.store import StoreWriter

    w = StoreWriter(tmp_path / "big", layers_dims={"CL1": 2}, n_rows=1, ids=["a"],
                    manifest={"dtype": "float16"})
    with pytest.raises(StoreError, match="exceed float16's range.*--dtype float32"):
        w.write(0, {"CL1": np.array([[1.0, 7e4]], dtype=np.float32)}, [0], [0])
