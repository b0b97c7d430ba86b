"""Vector codes against hand-worked maps, scipy.ndimage.center_of_mass and brute-force loops."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from somprobe.codes import center_of_mass, code_dim, layer_code, normalize_stats, vector_code


def _map(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_hand_worked_2x2():
    # [[0, 1], [2, 3]]: weights 0,1,2,3 at flat positions 0..3 → centroid 14/6, / 3
    code = vector_code(_map([[0, 1], [2, 3]]))
    assert code.shape == (1, 4)
    np.testing.assert_allclose(code[0].numpy(), [3.0, 1.5, math.sqrt(1.25), 14 / 6 / 3], rtol=1e-6)
    rc = center_of_mass(_map([[0, 1], [2, 3]]), "rc")[0, 0].numpy()
    # row masses 1, 5 → 5/6; column masses 2, 4 → 4/6
    np.testing.assert_allclose(rc, [5 / 6, 4 / 6], rtol=1e-6)


def test_minimum_shift_and_constant_maps():
    # shifted by the minimum, only the last pixel carries weight
    assert center_of_mass(_map([[5, 5], [5, 6]]))[0, 0].item() == pytest.approx(1.0)
    np.testing.assert_allclose(center_of_mass(_map([[5, 5], [5, 6]]), "rc")[0, 0].numpy(), [1, 1])
    # negative activations are fine: [-3, -1, -3] → weights 0, 2, 0 → middle
    assert center_of_mass(_map([[-3, -1, -3]]))[0, 0].item() == pytest.approx(0.5)
    # constant map and single pixel: 0.5 by definition
    assert center_of_mass(_map([[7, 7], [7, 7]]))[0, 0].item() == 0.5
    np.testing.assert_allclose(center_of_mass(_map([[7, 7], [7, 7]]), "rc")[0, 0].numpy(), [0.5, 0.5])
    assert center_of_mass(_map([[4.0]]))[0, 0].item() == 0.5
    np.testing.assert_allclose(center_of_mass(_map([[4.0]]), "rc")[0, 0].numpy(), [0.5, 0.5])
    # a 1×3 map: the row axis has one pixel → 0.5; the column centroid is real
    np.testing.assert_allclose(center_of_mass(_map([[0, 0, 1]]), "rc")[0, 0].numpy(), [0.5, 1.0])


def test_against_scipy_center_of_mass():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    x[1, 2] = 3.0  # one constant map
    rc = center_of_mass(torch.from_numpy(x), "rc").numpy()
    flat = center_of_mass(torch.from_numpy(x)).numpy()
    for b in range(3):
        for c in range(5):
            w = x[b, c] - x[b, c].min()
            if w.sum() == 0:
                np.testing.assert_allclose(rc[b, c], [0.5, 0.5])
                assert flat[b, c] == 0.5
                continue
            r, col = ndimage.center_of_mass(w)
            np.testing.assert_allclose(rc[b, c], [r / 5, col / 6], rtol=1e-5, atol=1e-6)
            (pos,) = ndimage.center_of_mass(w.ravel())
            assert flat[b, c] == pytest.approx(pos / (6 * 7 - 1), rel=1e-5)


def test_vector_code_matches_loops_and_layout():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    code = vector_code(torch.from_numpy(x)).numpy()
    assert code.shape == (2, 12)
    for b in range(2):
        for c in range(3):
            m = x[b, c]
            assert code[b, c] == pytest.approx(m.max())
            assert code[b, 3 + c] == pytest.approx(m.mean(), abs=1e-6)
            assert code[b, 6 + c] == pytest.approx(m.std(ddof=0), rel=1e-5)  # population std
    rc = vector_code(torch.from_numpy(x), com="rc").numpy()
    assert rc.shape == (2, 15)
    com = center_of_mass(torch.from_numpy(x), "rc").numpy()
    np.testing.assert_array_equal(rc[:, 9:12], com[..., 0])
    np.testing.assert_array_equal(rc[:, 12:15], com[..., 1])
    np.testing.assert_array_equal(rc[:, :9], code[:, :9])


def test_stats_subset_is_canonical_order():
    x = torch.randn(2, 3, 4, 4)
    full = vector_code(x)
    sub = vector_code(x, ["com", "max"])
    torch.testing.assert_close(sub, torch.cat([full[:, :3], full[:, 9:]], dim=1))
    assert normalize_stats("std, max") == ("max", "std")
    assert code_dim(64) == 256 and code_dim(64, "max,mean") == 128 and code_dim(64, com="rc") == 320


@pytest.mark.parametrize("stats,match", [([], "no statistics"), (["median"], "unknown statistic"),
                                         (["max", "max"], "twice")])
def test_bad_stats(stats, match):
    with pytest.raises(ValueError, match=match):
        vector_code(torch.randn(1, 1, 2, 2), stats)


def test_bad_com_and_shapes():
    with pytest.raises(ValueError, match="'flat' or 'rc'"):
        vector_code(torch.randn(1, 1, 2, 2), com="xy")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        vector_code(torch.randn(2, 3))


def test_layer_code_tokens_raw():
    tok = torch.randn(4, 16)
    assert layer_code(tok) is tok
    seq = torch.randn(4, 5, 16)
    assert layer_code(seq).shape == (4, 80)
    assert layer_code(torch.randn(4, 8, 3, 3)).shape == (4, 32)


def test_real_digits_codes():
    # real images as 1-channel feature maps: centre of mass agrees with scipy on every digit
    from sklearn.datasets import load_digits

    imgs = load_digits().images[:200].astype(np.float32)  # [N, 8, 8]
    rc = center_of_mass(torch.from_numpy(imgs)[:, None], "rc").numpy()[:, 0]
    ref = np.array([ndimage.center_of_mass(m - m.min()) for m in imgs]) / 7
    np.testing.assert_allclose(rc, ref, rtol=1e-5, atol=1e-6)
    code = vector_code(torch.from_numpy(imgs)[:, None]).numpy()
    np.testing.assert_allclose(code[:, 0], imgs.reshape(200, -1).max(1))
    np.testing.assert_allclose(code[:, 2], imgs.reshape(200, -1).std(1), rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
              elements=st.integers(-800, 800).map(lambda v: v / 8)),  # exact in float32
       st.floats(0.1, 10), st.floats(-50, 50))
def test_com_properties(x, scale, shift):
    t = torch.from_numpy(x)[None]
    com = center_of_mass(t, "rc")
    assert bool(((com >= 0) & (com <= 1)).all())
    flat = center_of_mass(t)
    assert bool(((flat >= 0) & (flat <= 1)).all())
    # invariant to adding a constant and to positive scaling (weights are shifted by the minimum)
    t2 = t.double() * scale + shift
    torch.testing.assert_close(center_of_mass(t2, "rc").float(), com, atol=1e-4, rtol=1e-4)
