"""Shift scores, rankings, bootstrap and the comparison scores on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from critlayers import reference
from critlayers import scores as S


def _band(n_layers: int, values: dict[tuple[int, int], float]) -> np.ndarray:
    m = np.eye(n_layers)
    for (i, j), v in values.items():
        m[i, j] = m[j, i] = v
    return m


def test_shift_by_hand_window3():
    m = np.array(
        [
            [1.0, 0.9, 0.5, 0.2],
            [0.9, 1.0, 0.6, 0.3],
            [0.5, 0.6, 1.0, 0.8],
            [0.2, 0.3, 0.8, 1.0],
        ]
    )
    delta = S.shift_scores(m, window=3)
    assert math.isnan(delta[0]) and math.isnan(delta[3])
    assert delta[1] == pytest.approx((0.9 + 1.0 + 0.6) / 3)
    assert delta[2] == pytest.approx((0.6 + 1.0 + 0.8) / 3)


def test_shift_window5_includes_diagonal_and_edges():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 1.0, (9, 9))
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    delta = S.shift_scores(m, window=5)
    assert np.isnan(delta[[0, 1, 7, 8]]).all()
    for layer in range(2, 7):
        expected = sum(m[layer, j] for j in range(layer - 2, layer + 3)) / 5
        assert delta[layer] == pytest.approx(expected, abs=1e-15)


def test_shift_window1_is_diagonal_and_full_window():
    m = _band(5, {(1, 2): 0.4})
    assert np.allclose(S.shift_scores(m, 1), 1.0)
    delta = S.shift_scores(m, 5)
    assert np.isnan(delta).sum() == 4 and delta[2] == pytest.approx((1 + 0.4) / 5)


def test_shift_accepts_tensor():
    m = torch.eye(4, dtype=torch.float64)
    assert np.allclose(S.shift_scores(m, 3)[1:3], 1 / 3)


@pytest.mark.parametrize("window", [0, 2, 4, -1, 1.0, True, "5"])
def test_shift_bad_window(window):
    with pytest.raises(ValueError, match="shift_scores: window"):
        S.shift_scores(np.eye(6), window)


def test_shift_window_larger_than_model():
    with pytest.raises(ValueError, match=r"window=7 is larger than the model's 6 layers.*5"):
        S.shift_scores(np.eye(6), 7)


def test_shift_bad_matrix():
    with pytest.raises(ValueError, match=r"shift_scores: cka must be .* got shape \(3, 4\)"):
        S.shift_scores(np.ones((3, 4)), 3)


def test_rank_and_critical_with_ties():
    shift = [None, 0.5, 0.9, 0.5, 0.2, math.nan]
    assert S.rank_layers(shift) == [4, 1, 3, 2]
    assert S.layer_ranks(shift) == [None, 2, 4, 3, 1, None]
    assert S.critical_layers(shift, 2) == [1, 4]
    assert S.critical_layers(np.array(shift, dtype=float), 3) == [1, 3, 4]


@pytest.mark.parametrize("k", [0, 5, 2.0, None])
def test_critical_bad_k(k):
    with pytest.raises(ValueError, match="critical_layers: k must be"):
        S.critical_layers([0.1, 0.2, 0.3, 0.4], k)


def _feats(n=24, n_layers=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    feats = []
    for layer in range(n_layers):
        x = x + (0.3 + 0.4 * (layer == 3)) * torch.randn(n, d, generator=g)
        feats.append(x.clone())
    return feats


def test_biased_cka_from_grams_matches_reference():
    feats = _feats()
    grams = torch.stack([f.double() @ f.double().T for f in feats])
    ours = S.biased_cka_from_grams(grams)
    ref = reference.cka_matrix(feats)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_bootstrap_reproducible_and_bounded():
    feats = _feats()
    a = S.bootstrap_shift(feats, window=3, top_k=2, n_boot=30, seed=7)
    b = S.bootstrap_shift(feats, window=3, top_k=2, n_boot=30, seed=7)
    c = S.bootstrap_shift(feats, window=3, top_k=2, n_boot=30, seed=8)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)
    assert a.samples.shape == (30, 6)
    assert np.isnan(a.shift_low[[0, 5]]).all()
    inner = slice(1, 5)
    assert (a.percentile_low[inner] <= a.shift_mean[inner]).all()
    assert (a.shift_mean[inner] <= a.percentile_high[inner]).all()
    np.testing.assert_allclose(a.shift, S.shift_scores(reference.cka_matrix(feats), 3))
    np.testing.assert_allclose(a.bias[inner], (a.shift_mean - a.shift)[inner])
    np.testing.assert_allclose(a.shift_low[inner], (a.percentile_low - a.bias)[inner])
    np.testing.assert_allclose(a.shift_high[inner], (a.percentile_high - a.bias)[inner])
    assert a.topk_freq.sum() == pytest.approx(2.0)
    assert a.topk_freq[[0, 5]].tolist() == [0.0, 0.0]
    d = a.to_dict()
    assert d["shift_low"][0] is None and len(d["topk_freq"]) == 6 and "samples" not in d


def test_bootstrap_default_equals_resampled_reference():
    feats = _feats(n=12, n_layers=4)
    boot = S.bootstrap_shift(feats, window=3, top_k=1, n_boot=3, seed=1)
    gen = torch.Generator().manual_seed(1)
    for b in range(3):
        idx = torch.randint(12, (12,), generator=gen)
        ref = reference.cka_matrix([f[idx] for f in feats])
        np.testing.assert_allclose(boot.samples[b], S.shift_scores(ref, 3), rtol=1e-10)


def test_bootstrap_custom_estimator_is_called():
    feats = _feats(n=10, n_layers=4)
    calls = []

    def cka_fn(resampled):
        calls.append(resampled[0].shape)
        return torch.eye(4, dtype=torch.float64)

    boot = S.bootstrap_shift(feats, window=3, top_k=1, n_boot=4, cka_fn=cka_fn)
    assert len(calls) == 5 and calls[0] == (10, 5)  # the full sample, then 4 resamples
    assert np.allclose(boot.shift_mean[1:3], 1 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 0}, "n_boot"),
        ({"ci": 1.0}, "ci"),
        ({"top_k": 5}, "top_k"),
        ({"window": 2}, "window"),
    ],
)
def test_bootstrap_bad_arguments(kwargs, match):
    args = dict(window=3, top_k=1, n_boot=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"bootstrap_shift: {match}"):
        S.bootstrap_shift(_feats(n_layers=6), **args)


def test_block_influence_and_angular_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s0 = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # rotates row 0 by 90 degrees
    s1 = torch.tensor([[0.0, -1.0], [0.0, 3.0]])  # rotates row 0 by another 180 degrees
    bi = S.block_influence(emb, [s0, s1])
    np.testing.assert_allclose(bi, [(1.0 + 0.0) / 2, (2.0 + 0.0) / 2])
    ad1 = S.angular_distance(emb, [s0, s1], n=1)
    np.testing.assert_allclose(ad1, [0.5 / 2, 1.0 / 2])
    ad2 = S.angular_distance(emb, [s0, s1], n=2)
    np.testing.assert_allclose(ad2[0], (0.5 + 0.0) / 2)
    assert math.isnan(ad2[1])


def test_state_scores_stream_equals_full():
    feats = _feats(n=20, n_layers=5)
    emb = torch.randn(20, 5, generator=torch.Generator().manual_seed(3))
    acc = S.StateScores(5, angular_n=2)
    for i in range(0, 20, 6):
        acc.update(emb[i : i + 6], [f[i : i + 6] for f in feats])
    np.testing.assert_allclose(acc.block_influence(), S.block_influence(emb, feats))
    np.testing.assert_allclose(
        acc.angular_distance(), S.angular_distance(emb, feats, 2), equal_nan=True
    )
    with pytest.raises(ValueError, match="StateScores: angular_n"):
        S.StateScores(3, angular_n=4)


def test_rank_and_curve_correlation():
    a = [None, 0.1, 0.2, 0.3, 0.4, None]
    assert S.rank_correlation(a, [9, 4, 3, 2, 1, 7]) == pytest.approx(-1.0)
    assert math.isnan(S.rank_correlation([None, 1, 2], [1, 2, 3]))
    assert math.isnan(S.rank_correlation([1, 1, 1, 1], [1, 2, 3, 4]))
    corr = S.curve_correlation(a, [0, 0.2, 0.4, 0.6, 0.8, 0])
    assert corr == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "n_layers": 4}
    with pytest.raises(ValueError, match="curve_correlation: a and b"):
        S.curve_correlation([1, 2, 3], [1, 2])
