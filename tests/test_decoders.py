"""Latent-to-image decoders: architecture per latent shape, training beats the linear bar,
save/load round trip, resume, corrupt/foreign files, the run job and the CLI on real digits."""
import json
import math
import pickle

import numpy as np
import pytest
import torch

from somprobe.errors import DecoderError
from somprobe.models import build_model, split_model
from somprobe.paths import decoder_job
from somprobe.paths.decoder_job import (
    load_decoder, read_decoder, require_decoder, save_decoder, train_decoders,
)
from somprobe.paths.decoders import (
    RIDGE_GRID, RidgeStats, build_decoder, decode, decoder_arch, fit_linear_decoder, fit_ridge,
    fit_gate, latent_kind, linear_basis, psnr, reduce_latent, train_epoch,
)
from somprobe.run import Run

torch.set_num_threads(1)


def _blobs(n, s=16, seed=0):
    """A Gaussian blob centred at z ∈ [0.2, 0.8]²: the image is not linear in z."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    r = (torch.arange(s) + 0.5) / s
    yy, xx = r.view(1, s, 1), r.view(1, 1, s)
    img = torch.exp(-((yy - z[:, 0, None, None]) ** 2 + (xx - z[:, 1, None, None]) ** 2) / (2 * 0.08 ** 2))
    return z, img[:, None].expand(-1, 3, -1, -1).contiguous()


def _mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("shape,prefix,kind,side", [
    ([64, 8, 8], 0, "map", 8), ([512, 1, 1], 0, "vector", 4), ([512], 0, "vector", 4),
    ([65, 64], 1, "tokens", 8), ([66, 32], 2, "tokens", 8), ([7, 16], 0, "vector", 4),
    ([256, 2, 2], 0, "map", 2),
])
def test_architecture_follows_latent_shape(shape, prefix, kind, side):
    arch = decoder_arch(shape, 32, prefix_tokens=prefix)
    assert (arch["kind"], arch["start_side"]) == (kind, side) == (latent_kind(shape, prefix), side)
    # one ×2 upsampling per octave from the start side to the image side, widths halving
    assert len(arch["widths"]) == 1 + math.ceil(math.log2(32 / side))
    assert arch["widths"][0] == 64 and all(a >= b for a, b in zip(arch["widths"], arch["widths"][1:]))
    d = build_decoder(shape, 32, prefix_tokens=prefix, width=16, blocks=1)
    out = d(torch.randn(3, *shape))
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(DecoderError, match="trained on"):
        d(torch.randn(3, *[s + 1 for s in shape]))


def _fit_part(d, z, x, zh=None, xh=None, grid=RIDGE_GRID):
    """Fit ``d``'s linear part on (z, x), ridge picked on (zh, xh)."""
    dim, n_pix = d.lin_weight.shape
    fit = RidgeStats(dim, n_pix).update(reduce_latent(z, d.linear), x)
    hold = RidgeStats(dim, n_pix).update(reduce_latent(zh, d.linear), xh) if zh is not None else None
    out = fit_ridge(fit, hold, grid=grid)
    d.set_linear(out["weight"], out["bias"])
    return out


def test_training_beats_linear_decoder_where_linear_cannot_be_exact():
    z, x = _blobs(512)
    zv, xv = _blobs(256, seed=1)
    zh, xh = _blobs(64, seed=2)
    linear = fit_linear_decoder(z, x)
    lin_mse = _mse(linear(zv), xv)
    d = build_decoder([2], 16, width=32, min_width=16, blocks=1, seed=0)
    _fit_part(d, z, x, zh, xh)
    start = _mse(decode(d, zv), xv)
    # a fresh linear + residual decoder is its least-squares linear part (the bar) exactly
    assert start == pytest.approx(lin_mse, rel=1e-4)
    opt = torch.optim.Adam(d.parameters(), 1e-3)  # the study's learning rate
    losses = []
    for epoch in range(8):
        perm = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        losses.append(train_epoch(d, opt, ((z[perm[i:i + 32]], x[perm[i:i + 32]]) for i in range(0, 512, 32))))
    assert losses[-1] < 0.5 * losses[0], losses
    # the trained conv decoder alone beats the linear map on these non-linear images; the gate
    # fitted on held-out blobs keeps the better of the two per pixel
    conv = _mse(d.conv(zv).detach(), xv)
    assert conv < 0.5 * lin_mse, (conv, lin_mse)
    assert float(d.gate.abs().max()) == 0  # training touches the conv decoder only
    gate = fit_gate(d, [(zh, xh)])
    assert 0 <= float(gate.min()) and float(gate.max()) <= 1 and float(gate.mean()) > 0.5
    end = _mse(decode(d, zv), xv)
    assert end < 0.5 * lin_mse and end < 1.2 * conv, (end, conv, lin_mse)
    # against a brute-force per-pixel search of the blend weight on the held-out blobs
    with torch.no_grad():
        lin_h, conv_h = d.linear_part(zh), d.conv(zh)
    ws = torch.linspace(0, 1, 201).view(-1, 1, 1, 1)
    err = ((lin_h[None] + ws[:, None] * (conv_h - lin_h)[None] - xh[None]) ** 2).sum(1)
    brute = ws.flatten()[err.argmin(0)]
    assert (gate - brute).abs().max() <= 0.005 + 1e-6


def test_linear_part_at_step_zero_is_lstsq_on_exactly_linear_latents():
    # latents that are an exactly (and invertibly) linear function of the images: the decoder
    # before any training step reproduces numpy's least-squares solution
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, 4, 4, generator=g) * 0.8 + 0.1
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    z = (x.flatten(1).double() @ q).float().view(300, 12, 2, 2) * 3 + 1
    d = build_decoder([12, 2, 2], 4, width=8, min_width=8, blocks=1, seed=0)
    assert d.linear == {"basis": "full", "dim": 48, "logit_residual": True}
    out = _fit_part(d, z[:250], x[:250], z[250:], x[250:])
    assert out["ridge"] == RIDGE_GRID[0]  # an exact linear relation: the least ridge wins held out
    zc = np.concatenate([z[:250].flatten(1).double().numpy(), np.ones((250, 1))], 1)
    coef = np.linalg.lstsq(zc, x[:250].flatten(1).double().numpy(), rcond=None)[0]
    ref = np.concatenate([z.flatten(1).double().numpy(), np.ones((300, 1))], 1) @ coef
    torch.testing.assert_close(decode(d, z).flatten(1), torch.from_numpy(ref).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(decode(d, z), x, atol=1e-5, rtol=0)
    # the untrained conv decoder starts at the same linear reconstruction (in logit space);
    # whatever gate is fitted, the blend stays the exact solution
    torch.testing.assert_close(d.conv(z).detach(), x, atol=1e-4, rtol=0)
    fit_gate(d, [(z[250:], x[250:])])
    torch.testing.assert_close(decode(d, z), x, atol=1e-4, rtol=0)
    # without the logit residual an untrained conv decoder is far worse: the gate stays ~0
    d0 = build_decoder([12, 2, 2], 4, width=8, min_width=8, blocks=1, seed=0, logit_residual=False)
    d0.set_linear(d.lin_weight, d.lin_bias)
    assert float(fit_gate(d0, [(z[250:], x[250:])]).max()) < 1e-3
    torch.testing.assert_close(decode(d0, z), x, atol=1e-4, rtol=0)


def test_ridge_holdout_scores_and_reduced_basis():
    g = torch.Generator().manual_seed(1)
    r, x = torch.randn(120, 10, generator=g), torch.rand(120, 6, generator=g)
    grid = (1e-6, 1e-2, 1.0, 10.0)
    out = fit_ridge(RidgeStats(10, 6).update(r[:60], x[:60]).update(r[60:100], x[60:100]),
                    RidgeStats(10, 6).update(r[100:], x[100:]), grid=grid)
    # every closed-form held-out score equals the brute-force one from an explicit solve
    mr, mx = r[:100].double().mean(0), x[:100].double().mean(0)
    rc, xc = r[:100].double() - mr, x[:100].double() - mx
    c = rc.T @ rc
    scale = torch.linalg.eigvalsh(c).clamp_min(0).mean()
    brute = []
    for v in grid:
        w = torch.linalg.solve(c + v * scale * torch.eye(10, dtype=torch.float64), rc.T @ xc)
        brute.append(float((((r[100:].double() - mr) @ w + mx - x[100:].double()) ** 2).mean()))
    assert out["holdout_mse"] == pytest.approx(brute, rel=1e-9)
    assert out["ridge"] == grid[int(np.argmin(brute))]
    with pytest.raises(DecoderError, match="--max-train"):
        fit_ridge(RidgeStats(10, 6).update(r[:1], x[:1]))
    with pytest.raises(DecoderError, match="non-finite"):
        RidgeStats(10, 6).update(torch.full((2, 10), float("nan")), x[:2])
    # latents above max_linear_dim are reduced by a fixed linear map before the fit
    assert linear_basis([64, 16, 16]) == {"basis": "avgpool2d", "factor": 2, "dim": 4096}
    assert linear_basis([197, 768]) == {"basis": "avgpool1d", "dim": 4096}
    assert linear_basis([512, 1, 1]) == {"basis": "full", "dim": 512}
    d = build_decoder([4, 4, 4], 8, width=8, min_width=8, blocks=1, max_linear_dim=16)
    assert d.linear == {"basis": "avgpool2d", "factor": 2, "dim": 16, "logit_residual": True}
    zz, xx = torch.randn(80, 4, 4, 4, generator=g), torch.rand(80, 3, 8, 8, generator=g) * 0.2 + 0.4
    _fit_part(d, zz, xx, grid=(1e-9,))
    pooled = torch.nn.functional.avg_pool2d(zz, 2).flatten(1)
    zc = np.concatenate([pooled.double().numpy(), np.ones((80, 1))], 1)
    coef = np.linalg.lstsq(zc, xx.flatten(1).double().numpy(), rcond=None)[0]
    torch.testing.assert_close(d.linear_part(zz).flatten(1), torch.from_numpy(zc @ coef).float(),
                               atol=1e-5, rtol=0)


def test_linear_decoder_is_least_squares():
    # an exactly linear map (images in (0, 1)) is recovered; primal and dual forms agree with lstsq
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g)
    w = torch.randn(6, 12, generator=g) * 0.02
    x = (0.5 + z @ w).view(200, 3, 2, 2)
    lin = fit_linear_decoder(z, x, ridge=1e-10)
    torch.testing.assert_close(lin(z), x, atol=1e-5, rtol=0)
    zw = torch.randn(20, 50, generator=g)  # D > N: dual form, interpolates the training set
    xw = torch.rand(20, 3, 2, 2, generator=g) * 0.5 + 0.25
    torch.testing.assert_close(fit_linear_decoder(zw, xw, ridge=1e-10)(zw), xw, atol=1e-4, rtol=0)
    # against numpy's lstsq on centred data (N > D)
    zn, xn = torch.randn(100, 5, generator=g), torch.rand(100, 3, 1, 1, generator=g) * 0.2 + 0.4
    zc = torch.cat([zn, torch.ones(100, 1)], 1).double().numpy()
    coef = np.linalg.lstsq(zc, xn.flatten(1).double().numpy(), rcond=None)[0]
    ref = torch.from_numpy(zc @ coef).float().clamp(0, 1).view_as(xn)
    torch.testing.assert_close(fit_linear_decoder(zn, xn, ridge=1e-12)(zn), ref, atol=1e-5, rtol=0)
    assert psnr(0.01) == pytest.approx(20.0) and psnr(0.0) == math.inf


def test_save_load_round_trip(tmp_path):
    d = build_decoder([65, 64], 32, prefix_tokens=1, width=16, blocks=1, seed=3)
    z = torch.randn(4, 65, 64)
    path = tmp_path / "CLS2.pt"
    save_decoder(path, d)
    back = read_decoder(path)
    assert back.arch == d.arch
    torch.testing.assert_close(decode(back, z), decode(d, z), rtol=0, atol=0)
    # the file is plain tensors + strings: a weights_only load opens it
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "somprobe-decoder" and json.loads(obj["arch"]) == d.arch


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EVIL_RAN",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_foreign_files_never_unpickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a decoder at all")
    with pytest.raises(DecoderError, match="corrupt or not a somprobe decoder"):
        read_decoder(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(DecoderError, match="not a somprobe decoder file"):
        read_decoder(foreign)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "somprobe-decoder", "version": 1, "arch": "{}", "state_dict": _Evil()}, evil)
    with pytest.raises(DecoderError, match="cannot read decoder"):
        read_decoder(evil)
    assert not (tmp_path / "EVIL_RAN").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DecoderError):
        read_decoder(raw)
    assert not (tmp_path / "EVIL_RAN").exists()
    # right format, wrong weights for the stored architecture
    d = build_decoder([8, 4, 4], 16, width=8, blocks=1)
    bad = tmp_path / "bad.pt"
    torch.save({"format": "somprobe-decoder", "version": 1, "arch": json.dumps(d.arch),
                "state_dict": {"out.weight": torch.zeros(1)}}, bad)
    with pytest.raises(DecoderError, match="inconsistent"):
        read_decoder(bad)


# ------------------------------------------------------------------ the run job on real digits
_KW = dict(dataset="mnist5k", max_train=128, max_val=64, n_linear=64, width=8, min_width=8, blocks=1,
           batch_size=16)


@pytest.fixture(scope="module")
def model():
    return build_model("test_resnet", num_classes=10, image_size=32, seed=0)


def test_job_on_mnist5k_cards_samples_and_load(tmp_path, model):
    run = Run(tmp_path / "run")
    with pytest.raises(DecoderError, match=r"somprobe decoder --out .* --layer CL2"):
        require_decoder(run, "CL2")
    cards = train_decoders(run, "CL2,CL4", model=model, epochs=2, lr=1e-2, **_KW)
    for layer, card in cards.items():
        assert card["latent_kind"] == ("map" if layer == "CL2" else "vector")
        # the decoder starts at its least-squares linear part, which is the bar (latents of at
        # most 4096 numbers), and keeps the best held-out epoch: it cannot lose to the bar there
        assert card["linear_basis"] == "full" and card["n_holdout"] == 13 and card["n_train"] == 115
        assert card["val_mse_init"] == pytest.approx(card["linear_val_mse"], abs=1e-6)
        assert card["linear_val_mse"] == card["linear_part_val_mse"]
        best = card["best_epoch"]
        assert card["best_holdout_mse"] == min([card["holdout_mse_init"]] + card["holdout_mse_epochs"])
        assert card["best_holdout_mse"] <= card["holdout_mse_init"]
        if best > 0:
            assert card["val_mse"] == pytest.approx(card["val_mse_epochs"][best - 1], abs=1e-6)
        assert card["val_mse"] <= card["linear_val_mse"] + 1e-7
        assert card["linear_ridge"] in RIDGE_GRID and len(card["linear_ridge_holdout_mse"]) == len(RIDGE_GRID)
        assert card["psnr"] == pytest.approx(10 * math.log10(1 / card["val_mse"]), abs=1e-3)
        assert card["class_kept"] == pytest.approx(card["decoded_acc"] / card["clean_acc"], abs=1e-5)
        assert card["beats_linear"] == (card["val_mse"] < card["linear_val_mse"])
        assert not run.decoder_state(layer).exists()
        dec = load_decoder(run, layer)
        head, _ = split_model(model, layer)
        sample = np.load(run.decoder_samples(layer))
        assert sample["original"].shape == sample["decoded"].shape == (8, 3, 32, 32)
        # the saved reconstructions are what the loaded decoder makes of those images
        x = torch.from_numpy(sample["original"]).float() / 255
        with torch.no_grad():
            again = (decode(dec, head(x)).clamp(0, 1) * 255).round()
        assert (again - torch.from_numpy(sample["decoded"]).float()).abs().max() <= 3
    table = __import__("pandas").read_csv(run.decoder_cards_csv)
    assert list(table.layer) == ["CL2", "CL4"] and table.loc[0, "latent_shape"] == "48x4x4"
    with pytest.raises(DecoderError, match="--overwrite"):
        train_decoders(run, "CL2", model=model, epochs=2, **_KW)
    # figures and the report's Decoders section come from the saved cards and samples
    from somprobe.plots import plot_run
    from somprobe.report import render_report

    other = Run(tmp_path / "other")
    other.model_dir.mkdir(parents=True)
    other.model_meta.write_text(json.dumps({"model": "test_resnet"}))
    empty = render_report(other)
    assert "Decoders" in empty and "somprobe decoder" in empty
    names = {p.stem for p in plot_run(run)}
    assert {"decoders-cards", "decoders-samples"} <= names
    html = render_report(run)
    assert "decoders/cards" in html and "fig-decoders-samples" in html and "linear_val_mse" in html


def test_resume_equals_uninterrupted(tmp_path, model, monkeypatch):
    kw = dict(model=model, epochs=2, lr=3e-3, **_KW)
    full = Run(tmp_path / "full")
    train_decoders(full, "CL3", **kw)
    cut = Run(tmp_path / "cut")
    real_save = decoder_job._save_state

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(decoder_job, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_decoders(cut, "CL3", **kw)
    monkeypatch.setattr(decoder_job, "_save_state", real_save)
    assert torch.load(cut.decoder_state("CL3"), weights_only=True)["epoch"] == 1
    with pytest.raises(DecoderError, match="--resume"):
        require_decoder(cut, "CL3")
    with pytest.raises(DecoderError, match="--resume to continue"):
        train_decoders(cut, "CL3", **kw)
    with pytest.raises(DecoderError, match="epochs=2"):
        train_decoders(cut, "CL3", **{**kw, "epochs": 3}, resume=True)
    train_decoders(cut, "CL3", **kw, resume=True)
    a, b = load_decoder(full, "CL3").state_dict(), load_decoder(cut, "CL3").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ca, cb = (json.loads(r.decoder_card("CL3").read_text()) for r in (full, cut))
    assert ca["train_mse"] == cb["train_mse"] and ca["val_mse"] == cb["val_mse"]
    # streaming the latents per batch (no cache) trains the same decoder up to float rounding
    stream = Run(tmp_path / "stream")
    train_decoders(stream, "CL3", **kw, cache_mb=0)
    cs = json.loads(stream.decoder_card("CL3").read_text())
    assert cs["val_mse"] == pytest.approx(ca["val_mse"], rel=1e-3)


def test_cli_decoder_on_digits(tmp_path):
    from click.testing import CliRunner

    from somprobe.cli import main

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["decoder", "--out", str(out), "--model", "test_resnet",
                                    "--data", "digits", "--layer", "CL4", "--epochs", "1",
                                    "--max-train", "64", "--max-val", "32", "--width", "8",
                                    "--blocks", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "CL4" in res.output and "linear" in res.output
    assert Run(out).decoder_card("CL4").is_file()
    bad = CliRunner().invoke(main, ["decoder", "--out", str(out), "--model", "test_resnet",
                                    "--data", "digits", "--layer", "module:layer2.0.conv1", "--quiet"])
    assert bad.exit_code == 1 and "not a cut" in bad.output and "Traceback" not in bad.output
