"""Kernel CKA between the representations of many layers, computed by the compiled engine.

Centred kernel alignment (Kornblith et al. 2019, arXiv:1905.00414) of two representations
``x`` (n, d_x) and ``y`` (n, d_y) of the same n examples, with Gram matrices ``K`` and ``L``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

Two HSIC estimators are offered:

* biased (Gretton et al. 2005), ``HSIC = <H K H, H L H>_F / (n - 1)^2`` with
  ``H = I - 1 1^T / n``: the estimator of the paper's scan;
* unbiased (Song et al. 2012, arXiv:0704.2668), through the U-centred Gram, divided by
  ``n (n - 3)``: unbiased for HSIC, close to 0 for independent data even when n << d, and the
  basis of minibatch CKA (Nguyen et al. 2021, arXiv:2010.15327).

The engine never forms a centring matrix or keeps an uncentred Gram. For the linear kernel,
while the centred upper triangles of all layers fit in 64 MiB, each layer is read once: its rows
are shifted by the first row (the centred Gram is shift-invariant), one matrix product per band
of rows forms the band's part of the Gram's upper triangle, the Gram's row sums (and from them
the centring offsets) are read off these blocks, and each block is centred into a store of
float32 values (float64 for float64 input); the HSIC of all pairs comes from float64 products
and sums over the stores. Otherwise (larger n, or the RBF kernel) it
walks the upper triangle of (tile x tile) blocks of the example index: per block it centres the
rows of each layer, forms that block of every layer's Gram with one matrix product, centres it
in the same pass, and adds the block's contribution to all pairwise HSIC sums at once, in
float64, with extra memory O(n_layers * tile^2 + n_layers * tile * d). For the linear kernel
with n much larger than the width, the same numbers come from the d x d feature-space form,
which is cheaper; ``method='auto'`` picks whichever needs fewer operations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import _ext, _fake
from ._validation import (
    as_feature_list,
    as_matrix,
    check_choice,
    check_examples,
    check_positive,
    engine_errors,
)

_ext.load()
_fake.register()
_ops = torch.ops.critlayers

__all__ = [
    "HSIC",
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "hsic",
    "cka",
    "linear_cka",
    "rbf_cka",
    "feature_space_linear_cka",
    "cka_matrix",
    "hsic_matrix",
    "gram_hsic_matrix",
    "cka_from_hsic",
    "median_sq_distance",
]

_KERNELS = ("linear", "rbf")
_METHODS = ("auto", "gram", "feature")
# Feature-space blocks (d_a x d_b, float64) held at once by cka_matrix(method="feature").
_FEATURE_BLOCK_BYTES = 256 * 2**20
# Rows of centred float32 features held at once by the feature-space pass.
_FEATURE_CHUNK_BYTES = 64 * 2**20


class HSIC(NamedTuple):
    """HSIC estimates of all layer pairs, float64.

    Attributes:
        xy: (n_x, n_y) HSIC between layer a of x and layer b of y.
        xx: (n_x,) HSIC of each layer of x with itself.
        yy: (n_y,) HSIC of each layer of y with itself.
    """

    xy: torch.Tensor
    xx: torch.Tensor
    yy: torch.Tensor


def _normaliser(n: int, unbiased: bool) -> float:
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / ((n - 1) ** 2)


def default_tile(n: int) -> int:
    """Tile edge for the Gram path: about 512 rows.

    n is split into ``round(n / 512)`` near-equal parts (two from n = 384 on), and an edge of
    128 rows or more is rounded up to a multiple of 64, on which BLAS products run faster
    than on odd sizes (n = 4096 gives 512, not 455 or 586).
    """
    n_tiles = max(1, round(n / 512))
    if n_tiles == 1 and n >= 384:
        n_tiles = 2
    edge = -(-n // n_tiles)
    return min(n, -(-edge // 64) * 64) if edge >= 128 else edge


def cpu_product_backend(width: int) -> str:
    """Where the engine's float32 Gram products of rows of ``width`` features run on the CPU.

    Returns ``'blas'`` (torch's BLAS, MKL in torch's x86 builds) or ``'onednn'`` (torch's
    oneDNN linear op). The default rule, measured on the benchmark machine of BENCHMARKS.md:
    oneDNN for rows of 2048 features or more, or on any CPU other than Intel's (where MKL does
    not take its fastest paths); BLAS otherwise. See :func:`set_cpu_product_backend`.
    """
    return _ext.load().cpu_product_backend(int(width))


def set_cpu_product_backend(name: str) -> None:
    """Sets the rule for the engine's CPU Gram products: ``'auto'``, ``'blas'`` or ``'onednn'``.

    ``'auto'`` is the default rule of :func:`cpu_product_backend`; the environment variable
    ``CRITLAYERS_CPU_GEMM`` sets the rule at start-up. Results agree across backends to float32
    rounding of the products. Raises ValueError for another name, or for ``'onednn'`` when
    torch was built without oneDNN.
    """
    _ext.load().set_cpu_product_backend(str(name))


def median_sq_distance(x: torch.Tensor) -> float:
    """Median of the n^2 squared distances between rows of ``x`` (n, d), zeros included.

    Follows ``numpy.median`` (the mean of the two middle values for an even count), the rule
    of Kornblith et al. 2019. Computed in float64.

    Note:
        Holds one layer's n x n distances at a time; for very large n pass an explicit
        ``sigma`` to the RBF functions instead.
    """
    x64 = x.detach().to(dtype=torch.float64)
    x64 = x64 - x64.mean(0)
    sq = (x64 * x64).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x64 @ x64.T)).clamp_min_(0.0)
    return float(np.median(d2.cpu().numpy()))


def _gammas(fn: str, feats: Sequence[torch.Tensor], threshold: float,
            sigma: float | None, n_x: int | None = None) -> list[float]:
    """1 / (2 sigma^2) per layer: sigma given, or sigma^2 = threshold^2 * median sq. distance.

    The median needs finite input, so the layers are checked here, named as the caller's
    arguments (``feats[i]``, then ``feats_y[j]`` from index ``n_x`` on).
    """
    out = []
    for i, x in enumerate(feats):
        if not bool(torch.isfinite(x).all()):
            name = f"feats[{i}]" if n_x is None or i < n_x else f"feats_y[{i - n_x}]"
            raise ValueError(f"{fn}: {name} contains NaN or Inf")
        if sigma is not None:
            sigma2 = float(sigma) ** 2
        else:
            sigma2 = float(threshold) ** 2 * median_sq_distance(x)
            if sigma2 == 0.0:
                # All rows identical: every bandwidth gives the same constant Gram.
                sigma2 = 1.0
        if not math.isfinite(sigma2) or sigma2 <= 0:
            raise ValueError(f"{fn}: the RBF bandwidth of layer {i} is not positive "
                             f"(sigma^2 = {sigma2})")
        out.append(1.0 / (2.0 * sigma2))
    return out


def _run(fn: str, op, *args, n_x: int | None = None, has_y: bool = False):
    """Calls an engine op; its ValueError names the public function and the caller's layer."""
    with engine_errors(fn, n_x, has_y):
        return op(*args)


def _gram_hsic_sums(fn: str, feats: list[torch.Tensor], kernel: str, unbiased: bool,
                    threshold: float, sigma: float | None, tile: int | None, n_x: int,
                    has_y: bool) -> torch.Tensor:
    n = feats[0].shape[0]
    gammas = _gammas(fn, feats, threshold, sigma, n_x) if kernel == "rbf" else []
    return _run(fn, _ops.gram_hsic, feats, kernel, gammas, unbiased, tile or default_tile(n),
                n_x=n_x, has_y=has_y)


def feature_pairs(n_x: int, n_y: int | None) -> list[tuple[int, int]]:
    """Pairs of layers (indices into x followed by y) whose moments give all of HSIC(x, y)."""
    if n_y is None:
        return [(a, b) for a in range(n_x) for b in range(a, n_x)]
    pairs = [(a, a) for a in range(n_x)] + [(n_x + b, n_x + b) for b in range(n_y)]
    return pairs + [(a, n_x + b) for a in range(n_x) for b in range(n_y)]


def feature_chunk_rows(feats: Sequence[torch.Tensor]) -> int:
    """Rows per pass of the feature-space accumulation, bounded by ``_FEATURE_CHUNK_BYTES``."""
    width = sum(int(x.shape[1]) for x in feats)
    return int(min(8192, max(256, _FEATURE_CHUNK_BYTES // (4 * width))))


def hsic_from_moments(n: int, unbiased: bool, cross: torch.Tensor, s_a: torch.Tensor,
                      s_b: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, qq_ab: float,
                      qsum_a: float, qsum_b: float) -> float:
    """HSIC of one layer pair from its feature-space moments (all float64).

    With shifted rows x_hat, ``cross = X_hat^T Y_hat``, ``s`` the column sums, ``q`` the row
    norms squared, ``va = X_hat^T q_y``, ``vb = Y_hat^T q_x``, ``qq_ab = q_x . q_y`` and
    ``qsum`` the totals of q:

    * biased: ``|cross - s_a s_b^T / n|_F^2 / (n - 1)^2``;
    * unbiased (Song et al. 2012, expanded in features): ``tr(K~ L~) = |cross|^2 - qq_ab``,
      ``1^T K~ 1 = |s_a|^2 - qsum_a``, ``1^T K~ L~ 1 = s_a^T cross s_b - s_a.va - s_b.vb + qq_ab``.
    """
    if not unbiased:
        centred = cross - torch.outer(s_a, s_b) / n
        return float((centred * centred).sum()) / (n - 1) ** 2
    trace = float((cross * cross).sum()) - qq_ab
    sum_k = float(s_a @ s_a) - qsum_a
    sum_l = float(s_b @ s_b) - qsum_b
    sum_kl = float(s_a @ (cross @ s_b)) - float(s_a @ va) - float(s_b @ vb) + qq_ab
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * sum_kl / (n - 2)) / (
        n * (n - 3))


def _feature_hsic(fn: str, feats: list[torch.Tensor], n_x: int, n_y: int | None,
                  unbiased: bool) -> dict[tuple[int, int], float]:
    """HSIC of every needed pair through the feature-space form, pairs in memory-bounded groups."""
    n = feats[0].shape[0]
    device = feats[0].device
    f64 = {"dtype": torch.float64, "device": device}
    shifts = [_chunked_mean(x) for x in feats]
    pairs = feature_pairs(n_x, n_y)
    chunk = feature_chunk_rows(feats)
    values: dict[tuple[int, int], float] = {}
    group: list[tuple[int, int]] = []
    group_bytes = 0

    def flush():
        cross = [torch.zeros(feats[a].shape[1], feats[b].shape[1], **f64) for a, b in group]
        va = [torch.zeros(feats[a].shape[1], **f64) for a, _ in group]
        vb = [torch.zeros(feats[b].shape[1], **f64) for _, b in group]
        colsum = [torch.zeros(x.shape[1], **f64) for x in feats]
        qq = torch.zeros(len(feats), len(feats), **f64)
        qsum = torch.zeros(len(feats), **f64)
        _run(fn, _ops.feature_moments_accumulate, feats, shifts, [a for a, _ in group],
             [b for _, b in group], cross, va, vb, colsum, qq, qsum, chunk, n_x=n_x,
             has_y=n_y is not None)
        for p, (a, b) in enumerate(group):
            values[(a, b)] = hsic_from_moments(
                n, unbiased, cross[p], colsum[a], colsum[b], va[p], vb[p], float(qq[a, b]),
                float(qsum[a]), float(qsum[b]))

    for a, b in pairs:
        size = 8 * feats[a].shape[1] * feats[b].shape[1]
        if group and group_bytes + size > _FEATURE_BLOCK_BYTES:
            flush()
            group, group_bytes = [], 0
        group.append((a, b))
        group_bytes += size
    flush()
    return values


def _chunked_mean(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], 8192):
        total += x[start:start + 8192].to(torch.float64).sum(0)
    return total / x.shape[0]


def _choose_method(feats: list[torch.Tensor], n_x: int, n_y: int | None, kernel: str,
                   method: str) -> str:
    if kernel != "linear" or method != "auto":
        return "gram" if kernel != "linear" else method
    n = feats[0].shape[0]
    width = sum(int(x.shape[1]) for x in feats)
    gram_cost = n * n * width / 2 + len(feats) ** 2 * n * n
    feature_cost = n * sum(feats[a].shape[1] * feats[b].shape[1]
                           for a, b in feature_pairs(n_x, n_y))
    return "feature" if feature_cost < gram_cost else "gram"


def hsic_matrix(feats, feats_y=None, *, kernel: str = "linear", unbiased: bool = False,
                threshold: float = 1.0, sigma: float | None = None, method: str = "auto",
                tile: int | None = None) -> HSIC:
    """HSIC between every pair of layers, from their features.

    Args:
        feats: the layers of x: a sequence of n_x tensors (n, d_l), or one (n_x, n, d) tensor.
        feats_y: optional layers of y (n_y of them, same n); without it y = x.
        kernel: ``'linear'`` (``K = x x^T``) or ``'rbf'``
            (``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``).
        unbiased: the unbiased estimator of Song et al. 2012 instead of the biased one.
        threshold: RBF bandwidth by the median rule of Kornblith et al. 2019,
            ``sigma^2 = threshold^2 * median`` of all n^2 squared distances of that layer.
        sigma: RBF bandwidth as an absolute value for every layer (overrides ``threshold``).
        method: ``'gram'`` (tiled n x n form), ``'feature'`` (d x d form, linear only) or
            ``'auto'`` (the one with fewer operations).
        tile: largest block edge of the Gram form (default: about 512; the whole-layer
            schedule uses bands of at most 128 rows).

    Returns:
        :class:`HSIC` with ``xy`` (n_x, n_y), ``xx`` (n_x,), ``yy`` (n_y,), float64, on the
        features' device; normalised by 1/(n-1)^2 (biased) or 1/(n(n-3)) (unbiased).

    Raises:
        ValueError: layers with different n, wrong rank, empty input, NaN or Inf, n <= 3 with
            ``unbiased``, an unknown kernel or method.

    Note:
        Inputs of any float dtype and strides are read in place; arithmetic runs in float32
        (float64 for float64 inputs) on features centred and rescaled per layer in float64,
        and all sums are float64.
    """
    fn = "critlayers.hsic_matrix"
    return _hsic_matrix(fn, feats, feats_y, kernel, unbiased, threshold, sigma, method, tile)


def _hsic_matrix(fn, feats, feats_y, kernel, unbiased, threshold, sigma, method, tile) -> HSIC:
    check_choice(fn, "kernel", kernel, _KERNELS)
    check_choice(fn, "method", method, _METHODS)
    if method == "feature" and kernel != "linear":
        raise ValueError(f"{fn}: method='feature' needs kernel='linear', got {kernel!r}")
    check_positive(fn, "threshold", threshold)
    check_positive(fn, "sigma", sigma, allow_none=True)
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"{fn}: tile must be a positive integer, got {tile!r}")
    xs = as_feature_list(fn, "feats", feats)
    ys = None if feats_y is None else as_feature_list(fn, "feats_y", feats_y)
    n = xs[0].shape[0]
    if ys is not None:
        if ys[0].shape[0] != n:
            raise ValueError(f"{fn}: feats_y has n = {ys[0].shape[0]} examples but feats has "
                             f"n = {n}; both must hold the same examples in the same order")
        if ys[0].device != xs[0].device:
            raise ValueError(f"{fn}: feats_y is on {ys[0].device} but feats is on "
                             f"{xs[0].device}")
    check_examples(fn, n, unbiased)
    n_x, n_y = len(xs), None if ys is None else len(ys)
    everything = xs + (ys or [])
    chosen = _choose_method(everything, n_x, n_y, kernel, method)
    if chosen == "gram":
        sums = _gram_hsic_sums(fn, everything, kernel, unbiased, threshold, sigma, tile, n_x,
                               ys is not None)
        sums = (sums + sums.T) * (_normaliser(n, unbiased) / 2)
        diag = sums.diagonal()
        if ys is None:
            return HSIC(sums, diag.clone(), diag.clone())
        return HSIC(sums[:n_x, n_x:].clone(), diag[:n_x].clone(), diag[n_x:].clone())
    values = _feature_hsic(fn, everything, n_x, n_y, unbiased)
    return assemble_hsic(values, n_x, n_y, xs[0].device)


def assemble_hsic(values: dict[tuple[int, int], float], n_x: int, n_y: int | None,
                  device: torch.device) -> HSIC:
    """An :class:`HSIC` from per-pair values keyed as in :func:`feature_pairs`."""
    f64 = {"dtype": torch.float64, "device": device}
    xx = torch.tensor([values[(a, a)] for a in range(n_x)], **f64)
    if n_y is None:
        xy = torch.empty(n_x, n_x, **f64)
        for (a, b), v in values.items():
            xy[a, b] = xy[b, a] = v
        return HSIC(xy, xx, xx.clone())
    yy = torch.tensor([values[(n_x + b, n_x + b)] for b in range(n_y)], **f64)
    xy = torch.tensor([[values[(a, n_x + b)] for b in range(n_y)] for a in range(n_x)], **f64)
    return HSIC(xy, xx, yy)


def cka_from_hsic(hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor, *,
                  fn: str = "critlayers.cka_from_hsic") -> torch.Tensor:
    """CKA from HSIC estimates: ``hsic_xy / sqrt(hsic_xx[:, None] * hsic_yy[None, :])``.

    Args:
        hsic_xy: (n_x, n_y) cross HSIC. hsic_xx: (n_x,). hsic_yy: (n_y,).

    Returns:
        (n_x, n_y) float64 CKA. A layer whose self-HSIC is not positive (a constant layer, or
        an unbiased estimate at or below zero) has an undefined CKA: its row or column is NaN
        and one warning names the layers. Negative cross terms of the unbiased estimator are
        returned as computed, never clamped.
    """
    xy = hsic_xy.to(torch.float64)
    xx = hsic_xx.to(torch.float64)
    yy = hsic_yy.to(torch.float64)
    bad_x = (xx <= 0).nonzero().flatten().tolist()
    bad_y = (yy <= 0).nonzero().flatten().tolist()
    if bad_x or bad_y:
        parts = []
        if bad_x:
            parts.append(f"layers {bad_x} of x")
        if bad_y and not (bad_y == bad_x and xx.shape == yy.shape and torch.equal(xx, yy)):
            parts.append(f"layers {bad_y} of y")
        warnings.warn(
            f"{fn}: {' and '.join(parts)} have no positive self-HSIC (constant features, or "
            "an unbiased estimate at or below zero); their CKA is undefined and reported as NaN",
            RuntimeWarning, stacklevel=3)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=xy.device)
    root_x = torch.where(xx > 0, xx.clamp_min(0).sqrt(), nan)
    root_y = torch.where(yy > 0, yy.clamp_min(0).sqrt(), nan)
    return xy / root_x[:, None] / root_y[None, :]


def cka_matrix(feats, feats_y=None, *, kernel: str = "linear", unbiased: bool = False,
               threshold: float = 1.0, sigma: float | None = None, method: str = "auto",
               tile: int | None = None) -> torch.Tensor:
    """CKA between every pair of layers: the (n_x, n_x) map of one model, or (n_x, n_y).

    ``CKA(a, b) = HSIC(K_a, L_b) / sqrt(HSIC(K_a, K_a) HSIC(L_b, L_b))``, with the kernel and
    estimator chosen as in :func:`hsic_matrix` (which documents every argument).

    Args:
        feats: n_x tensors (n, d_l) or one (n_x, n, d) tensor.
        feats_y: optional n_y tensors (n, d_l) of a second layer set (e.g. another model).

    Returns:
        (n_x, n_y) float64 tensor on the features' device (n_y = n_x without ``feats_y``).
        Constant layers give NaN rows/columns and one warning.

    Example:
        >>> import torch, critlayers as cl
        >>> x = torch.randn(300, 64)
        >>> m = cl.cka_matrix([x, 2 * x, torch.randn(300, 32)])
        >>> round(float(m[0, 1]), 6)
        1.0
    """
    fn = "critlayers.cka_matrix"
    h = _hsic_matrix(fn, feats, feats_y, kernel, unbiased, threshold, sigma, method, tile)
    out = cka_from_hsic(h.xy, h.xx, h.yy, fn=fn)
    if feats_y is None:
        out = (out + out.T) / 2
        out.diagonal()[h.xx > 0] = 1.0
    return out


def _pair_cka(fn: str, x, y, kernel: str, unbiased: bool, threshold: float,
              sigma: float | None, method: str) -> torch.Tensor:
    h = _hsic_matrix(fn, [as_matrix(fn, "x", x)], [as_matrix(fn, "y", y)], kernel, unbiased,
                     threshold, sigma, method, None)
    return cka_from_hsic(h.xy, h.xx, h.yy, fn=fn)[0, 0]


def linear_cka(x, y, unbiased: bool = False) -> torch.Tensor:
    """Linear CKA of ``x`` (n, d_x) and ``y`` (n, d_y), the same n examples in the same order.

    Biased (Kornblith et al. 2019): ``|Xc^T Yc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)`` with
    column-centred features; unbiased: through the U-centred Grams (Song et al. 2012).

    Returns:
        0-d float64 tensor on the inputs' device; NaN (with a warning) for constant input.

    Note:
        Biased CKA is inflated when n << d (two independent Gaussian matrices with n = 32,
        d = 512 give about 0.94); use ``unbiased=True`` there.
    """
    return _pair_cka("critlayers.linear_cka", x, y, "linear", unbiased, 1.0, None, "auto")


def rbf_cka(x, y, threshold: float = 1.0, sigma: float | None = None,
            unbiased: bool = False) -> torch.Tensor:
    """RBF-kernel CKA of ``x`` (n, d_x) and ``y`` (n, d_y).

    ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``; without ``sigma`` each of x and y gets
    ``sigma^2 = threshold^2 * median`` of its n^2 squared distances (Kornblith et al. 2019,
    diagonal zeros included).

    Returns:
        0-d float64 tensor on the inputs' device.
    """
    return _pair_cka("critlayers.rbf_cka", x, y, "rbf", unbiased, threshold, sigma, "gram")


def feature_space_linear_cka(x, y, unbiased: bool = False) -> torch.Tensor:
    """Linear CKA of ``x`` (n, d_x) and ``y`` (n, d_y) in the d x d feature-space form.

    Equal to :func:`linear_cka`; costs O(n d_x d_y) instead of O(n^2 (d_x + d_y)), so it is the
    faster form when n is much larger than the widths.

    Returns:
        0-d float64 tensor on the inputs' device.
    """
    return _pair_cka("critlayers.feature_space_linear_cka", x, y, "linear", unbiased, 1.0, None,
                     "feature")


def gram_linear(x) -> torch.Tensor:
    """Linear Gram matrix ``K = x x^T`` of ``x`` (n, d). Returns (n, n) float64."""
    x = as_matrix("critlayers.gram_linear", "x", x).to(torch.float64)
    return x @ x.T


def gram_rbf(x, threshold: float = 1.0, sigma: float | None = None) -> torch.Tensor:
    """RBF Gram ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` of ``x`` (n, d), float64.

    Without ``sigma``, ``sigma^2 = threshold^2 * median`` of the n^2 squared distances
    (Kornblith et al. 2019, diagonal zeros included).
    """
    fn = "critlayers.gram_rbf"
    check_positive(fn, "threshold", threshold)
    check_positive(fn, "sigma", sigma, allow_none=True)
    x = as_matrix(fn, "x", x).to(torch.float64)
    x = x - x.mean(0)
    gamma = _gammas(fn, [x], threshold, sigma)[0]
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return torch.exp(-gamma * d2)


def _check_symmetric(fn: str, arg: str, k: torch.Tensor) -> None:
    scale = float(k.abs().max()) or 1.0
    asym = float((k - k.T).abs().max())
    if asym > 1e-5 * scale:
        raise ValueError(f"{fn}: {arg} must be symmetric; max |{arg} - {arg}^T| = {asym:.3g} "
                         f"(largest entry {scale:.3g})")


def center_gram(gram, unbiased: bool = False) -> torch.Tensor:
    """Centred copy of a symmetric Gram matrix (n, n), float64.

    Biased: ``H K H`` with ``H = I - 1 1^T / n``, computed from row sums (no n x n H). Unbiased:
    the U-centred Gram of Song et al. 2012 (diagonal zeroed, off-diagonal means removed with
    the corrections that make ``<Ku, Lu> / (n (n - 3))`` the unbiased HSIC).

    Raises:
        ValueError: ``gram`` is not square and symmetric, or n is too small.
    """
    fn = "critlayers.center_gram"
    k = as_matrix(fn, "gram", gram, square=True)
    _check_symmetric(fn, "gram", k)
    check_examples(fn, k.shape[0], unbiased)
    return _run(fn, _ops.center_gram, k, unbiased)


def _gram_hsic(fn: str, arg_x: str, gx: torch.Tensor, arg_y: str, gy: torch.Tensor | None,
               unbiased: bool) -> HSIC:
    """HSIC of stacked Grams; the Grams are centred block by block of rows inside the op."""
    if gy is not None and gy.shape[1] != gx.shape[1]:
        raise ValueError(f"{fn}: {arg_y} has n = {gy.shape[1]} but {arg_x} has n = "
                         f"{gx.shape[1]}")
    n = gx.shape[1]
    check_examples(fn, n, unbiased)
    both = gx if gy is None else torch.cat(
        [gx, gy] if gx.dtype == gy.dtype else [gx.to(torch.float64), gy.to(torch.float64)])
    block = max(1, min(n, (32 * 2**20) // (16 * n * both.shape[0])))
    full = _run(fn, _ops.gram_pair_hsic, both, both, unbiased, block) * _normaliser(n, unbiased)
    full = (full + full.T) / 2
    diag = full.diagonal()
    if gy is None:
        return HSIC(full, diag.clone(), diag.clone())
    n_x = gx.shape[0]
    return HSIC(full[:n_x, n_x:].clone(), diag[:n_x].clone(), diag[n_x:].clone())


def gram_hsic_matrix(grams_x, grams_y=None, unbiased: bool = False) -> HSIC:
    """HSIC between stacked Gram matrices ``grams_x`` (n_x, n, n) and ``grams_y`` (n_y, n, n).

    The Grams are centred block by block of rows while their inner products accumulate, so no
    centred copy of the stack exists.

    Returns:
        :class:`HSIC` (xy (n_x, n_y), xx (n_x,), yy (n_y,)), float64, normalised as
        :func:`hsic`.
    """
    fn = "critlayers.gram_hsic_matrix"
    gx = _as_gram_stack(fn, "grams_x", grams_x)
    gy = None if grams_y is None else _as_gram_stack(fn, "grams_y", grams_y)
    return _gram_hsic(fn, "grams_x", gx, "grams_y", gy, unbiased)


def _as_gram_stack(fn: str, arg: str, grams) -> torch.Tensor:
    t = grams.detach() if isinstance(grams, torch.Tensor) else torch.as_tensor(np.asarray(grams))
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape[1] == 0:
        raise ValueError(f"{fn}: {arg} must be (n_layers, n, n) or (n, n), got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {arg} contains NaN or Inf")
    return t


def hsic(k, l, unbiased: bool = False) -> torch.Tensor:
    """HSIC of two Gram matrices (n, n).

    Biased: ``<H K H, H L H>_F / (n - 1)^2``. Unbiased (Song et al. 2012):
    ``<Ku, Lu>_F / (n (n - 3))`` with U-centred Grams. Returns a 0-d float64 tensor.
    """
    fn = "critlayers.hsic"
    kk = as_matrix(fn, "k", k, square=True).unsqueeze(0)
    ll = as_matrix(fn, "l", l, square=True).unsqueeze(0)
    return _gram_hsic(fn, "k", kk, "l", ll, unbiased).xy[0, 0]


def cka(k, l, unbiased: bool = False) -> torch.Tensor:
    """CKA of two Gram matrices (n, n): ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Returns a 0-d float64 tensor; NaN with a warning when a self-HSIC is not positive.
    """
    fn = "critlayers.cka"
    kk = as_matrix(fn, "k", k, square=True).unsqueeze(0)
    ll = as_matrix(fn, "l", l, square=True).unsqueeze(0)
    h = _gram_hsic(fn, "k", kk, "l", ll, unbiased)
    return cka_from_hsic(h.xy, h.xx, h.yy, fn=fn)[0, 0]
