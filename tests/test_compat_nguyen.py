"""critlayers.compat.nguyen (MinibatchCKA) against a restatement of the original estimator.

The original is a TensorFlow metric; the oracle here restates its math in NumPy: per batch, each
layer's Gram is U-centred and flattened, and the inner products of all pairs are summed.
"""

import numpy as np
import pytest
import torch

from critlayers import reference as ref
from critlayers.compat.nguyen import MinibatchCKA


def _u_centred(x):
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    n = x.shape[0]
    g = x @ x.T
    np.fill_diagonal(g, 0.0)
    means = g.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    g = g - means[:, None] - means[None, :]
    np.fill_diagonal(g, 0.0)
    return g.ravel()


def _oracle(batches1, batches2, normalise):
    """Accumulated CKA; ``normalise`` divides each batch by n (n - 3) as the paper does."""
    xy = xx = yy = 0.0
    for acts1, acts2 in zip(batches1, batches2, strict=True):
        g1 = np.stack([_u_centred(a) for a in acts1])
        g2 = np.stack([_u_centred(a) for a in acts2])
        n = acts1[0].shape[0]
        scale = 1.0 / (n * (n - 3)) if normalise else 1.0
        xy = xy + scale * g1 @ g2.T
        xx = xx + scale * np.einsum("ij,ij->i", g1, g1)
        yy = yy + scale * np.einsum("ij,ij->i", g2, g2)
    return xy / np.sqrt(xx[:, None] * yy[None, :])


def _model_batches(sizes, seed, n_layers=3, width=10):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((width, width)) / np.sqrt(width) for _ in range(n_layers)]
    batches = []
    for n in sizes:
        h = rng.standard_normal((n, width)) + 0.5
        acts = []
        for w in weights:
            h = np.tanh(h @ w) + 0.1 * rng.standard_normal((n, width))
            acts.append(h.reshape(n, 2, width // 2))
        batches.append(acts)
    return batches


def test_single_batch_equals_debiased_cka():
    (acts,) = _model_batches([24], seed=0)
    metric = MinibatchCKA(3)
    metric.update_state(acts)
    flat = [a.reshape(24, -1) for a in acts]
    expected = ref.cka_matrix(flat, unbiased=True).numpy()
    np.testing.assert_allclose(metric.result().numpy(), expected, atol=1e-10)


def test_equal_batches_match_original_accumulation():
    batches = _model_batches([16, 16, 16], seed=1)
    metric = MinibatchCKA(3)
    for acts in batches:
        metric.update_state([torch.tensor(a, dtype=torch.float32) for a in acts])
    out = metric.result()
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (3, 3)
    np.testing.assert_allclose(out.numpy(), _oracle(batches, batches, normalise=False),
                               atol=1e-5)


def test_across_models_with_ragged_last_batch_follows_the_paper():
    batches1 = _model_batches([20, 20, 7], seed=2, n_layers=3)
    batches2 = _model_batches([20, 20, 7], seed=3, n_layers=2)
    metric = MinibatchCKA(3, 2, across_models=True)
    for a1, a2 in zip(batches1, batches2, strict=True):
        metric.update_state_across_models(a1, a2)
    out = metric.result().numpy()
    paper = _oracle(batches1, batches2, normalise=True)
    original = _oracle(batches1, batches2, normalise=False)
    np.testing.assert_allclose(out, paper, atol=1e-10)
    assert np.abs(out - original).max() > 1e-6
    metric.reset_state()
    metric.update_state_across_models(batches1[0], batches2[0])
    np.testing.assert_allclose(metric.result().numpy(),
                               _oracle(batches1[:1], batches2[:1], True), atol=1e-10)


def test_misuse_raises_with_names():
    (acts,) = _model_batches([8], seed=4)
    with pytest.raises(ValueError, match="update_state_across_models"):
        MinibatchCKA(3).update_state_across_models(acts, acts)
    with pytest.raises(ValueError, match="across_models=True"):
        MinibatchCKA(3, 3, across_models=True).update_state(acts)
    with pytest.raises(ValueError, match="more than 3 examples"):
        MinibatchCKA(3).update_state([a[:3] for a in acts])
    with pytest.raises(ValueError, match="one activation per layer"):
        MinibatchCKA(2).update_state(acts)
    with pytest.raises(ValueError, match="num_layers2"):
        MinibatchCKA(3, 2)
