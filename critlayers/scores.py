"""Layer scores computed from a CKA matrix or from captured block states.

The main score is the shift score of Liu et al., "Spectral Insights into Data-Oblivious
Critical Layers in Large Language Models" (arXiv:2506.00382):

    delta^l = (1 / w) * sum_{j = l - h}^{l + h} CKA(l, j),    w = 2 h + 1,

the mean CKA between block ``l`` and the blocks in a window of odd width ``w`` centred on it,
``j = l`` included. Only centres whose window lies inside the model are scored
(``h <= l <= n_layers - 1 - h``). A low ``delta^l`` means block ``l`` changes the
representation more than its neighbours; the lowest ``k`` are the critical layers.

For comparison the module also computes two scores from the pruning literature on the same
states, both per block and averaged over examples:

* block influence (Men et al., "ShortGPT", arXiv:2403.03853):
  ``BI_l = 1 - cos(h_in(l), h_out(l))``, the input and output of block ``l``;
* angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers",
  arXiv:2403.17887): ``d_n(l) = arccos(cos(h_in(l), h_in(l + n))) / pi``, the change made by
  the ``n`` blocks ``l .. l + n - 1`` (``h_in(l + n)`` is the output of block ``l + n - 1``).

High block influence and high angular distance mean a large change, the opposite sign of
``delta``. Layer indices are 0-based blocks throughout; a score that is not defined for a
block is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "check_window",
    "shift_scores",
    "rank_layers",
    "layer_ranks",
    "critical_layers",
    "BootstrapResult",
    "bootstrap_shift",
    "biased_cka_from_grams",
    "StateScores",
    "block_influence",
    "angular_distance",
    "rank_correlation",
    "curve_correlation",
]


def _as_matrix(cka, fn: str) -> np.ndarray:
    m = np.asarray(
        cka.detach().cpu().numpy() if isinstance(cka, torch.Tensor) else cka, dtype=np.float64
    )
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"{fn}: cka must be a non-empty square (n_layers, n_layers) matrix, "
            f"got shape {tuple(m.shape)}"
        )
    return m


def _as_vector(shift, fn: str, name: str = "shift") -> np.ndarray:
    values = [
        math.nan if v is None else v
        for v in (shift.tolist() if isinstance(shift, (np.ndarray, torch.Tensor)) else shift)
    ]
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{fn}: {name} must be one value per layer, got shape {v.shape}")
    return v


def check_window(window, n_layers: int, fn: str = "shift_scores") -> int:
    """Validate a shift-score window width for a model of ``n_layers`` blocks.

    Returns:
        The window as an ``int``.

    Raises:
        ValueError: if ``window`` is not an odd integer in ``[1, n_layers]``.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise ValueError(f"{fn}: window must be an odd integer, got {window!r}")
    window = int(window)
    if window < 1 or window % 2 == 0:
        raise ValueError(
            f"{fn}: window must be a positive odd integer (3, 5, 7, ...), got {window}"
        )
    if window > n_layers:
        largest = n_layers if n_layers % 2 else n_layers - 1
        raise ValueError(
            f"{fn}: window={window} is larger than the model's {n_layers} layers; "
            f"use an odd window of at most {largest}"
        )
    return window


def shift_scores(cka, window: int = 5) -> np.ndarray:
    """Shift score ``delta^l`` of every layer from an all-pairs CKA matrix.

    ``delta^l = mean_{j = l - h .. l + h} CKA(l, j)`` with ``h = (window - 1) / 2``, the
    diagonal included (arXiv:2506.00382, section 3).

    Args:
        cka: (n_layers, n_layers) CKA matrix (tensor, array or nested lists).
        window: odd window width, at most ``n_layers``; 5 in the paper's figures.

    Returns:
        (n_layers,) float64 array; NaN for the ``h`` layers at each end, whose window does not
        fit inside the model.

    Raises:
        ValueError: if ``cka`` is not square or ``window`` is not odd or exceeds ``n_layers``.
    """
    m = _as_matrix(cka, "shift_scores")
    n_layers = m.shape[0]
    window = check_window(window, n_layers)
    half = window // 2
    out = np.full(n_layers, np.nan)
    for layer in range(half, n_layers - half):
        out[layer] = m[layer, layer - half : layer + half + 1].mean()
    return out


def rank_layers(shift) -> list[int]:
    """Scored layers ordered from most to least critical (ascending ``delta``).

    Layers with a NaN or ``None`` score are left out. Ties keep layer order (the shallower
    layer first), so the ranking is deterministic.

    Args:
        shift: (n_layers,) scores, NaN or ``None`` where undefined.

    Returns:
        Layer indices, lowest score first.
    """
    v = _as_vector(shift, "rank_layers")
    scored = [i for i in range(len(v)) if np.isfinite(v[i])]
    return sorted(scored, key=lambda i: (v[i], i))


def layer_ranks(shift) -> list[int | None]:
    """Rank of every layer (1 = lowest ``delta``, most critical); ``None`` where unscored."""
    v = _as_vector(shift, "layer_ranks")
    ranks: list[int | None] = [None] * len(v)
    for rank, layer in enumerate(rank_layers(v), start=1):
        ranks[layer] = rank
    return ranks


def critical_layers(shift, k: int = 5) -> list[int]:
    """The ``k`` layers with the lowest shift score, in increasing layer order.

    Args:
        shift: (n_layers,) scores, NaN or ``None`` where undefined.
        k: how many layers; the paper uses 5.

    Returns:
        ``k`` layer indices sorted by index (see :func:`rank_layers` for the order by score).

    Raises:
        ValueError: if ``k`` is not between 1 and the number of scored layers.
    """
    order = rank_layers(shift)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(order):
        raise ValueError(
            f"critical_layers: k must be an integer between 1 and the number of "
            f"scored layers ({len(order)}), got {k!r}"
        )
    return sorted(order[:k])


def biased_cka_from_grams(grams: torch.Tensor) -> torch.Tensor:
    """All-pairs biased linear CKA from stacked Gram matrices.

    ``CKA(k, l) = <H k H, H l H>_F / (|H k H|_F |H l H|_F)`` with ``H = I - 1 1^T / n``; the
    centring is done by subtracting row, column and grand means, never with an explicit ``H``.

    Args:
        grams: (n_layers, n, n) Gram matrices ``k_l = x_l x_l^T``.

    Returns:
        (n_layers, n_layers) float64 tensor; NaN where a layer's centred Gram is zero.
    """
    g = grams.to(torch.float64)
    g = g - g.mean(1, keepdim=True) - g.mean(2, keepdim=True) + g.mean((1, 2), keepdim=True)
    flat = g.reshape(g.shape[0], -1)
    hsic = flat @ flat.T
    norms = hsic.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, hsic / denom, torch.full_like(hsic, math.nan))


@dataclass
class BootstrapResult:
    """Bootstrap distribution of the shift scores over resampled prompts.

    The interval is the bias-adjusted percentile interval: the percentiles of the resampled
    scores, each moved by the bootstrap estimate of the bias, ``mean(delta*) - delta``.
    Resampling with replacement repeats prompts, and repeated rows raise the biased CKA (fewer
    distinct examples), so the raw percentiles sit above ``delta``; the adjustment removes
    that shift and keeps the spread. Top-k frequencies are rank statistics and need no
    adjustment.

    Attributes:
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        ci: coverage of the interval, e.g. 0.95 for the 2.5th to 97.5th percentiles.
        top_k: the ``k`` used for :attr:`topk_freq`.
        shift: (n_layers,) ``delta^l`` on all examples (NaN where unscored).
        shift_mean: (n_layers,) mean of ``delta^l`` over resamples.
        bias: (n_layers,) ``shift_mean - shift``.
        shift_low: (n_layers,) lower end of the bias-adjusted interval.
        shift_high: (n_layers,) upper end of the bias-adjusted interval.
        percentile_low: (n_layers,) raw lower percentile of the resampled ``delta^l``.
        percentile_high: (n_layers,) raw upper percentile.
        topk_freq: (n_layers,) fraction of resamples in which the layer is among the ``k``
            lowest.
        samples: (n_boot, n_layers) all resampled shift scores.
    """

    n_boot: int
    seed: int
    ci: float
    top_k: int
    shift: np.ndarray
    shift_mean: np.ndarray
    bias: np.ndarray
    shift_low: np.ndarray
    shift_high: np.ndarray
    percentile_low: np.ndarray
    percentile_high: np.ndarray
    topk_freq: np.ndarray
    samples: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready summary (the samples themselves are left out); NaN becomes ``None``."""
        return {
            "n_boot": self.n_boot,
            "seed": self.seed,
            "ci": self.ci,
            "top_k": self.top_k,
            "interval": "bias-adjusted percentile",
            "shift_mean": _nan_to_none(self.shift_mean),
            "bias": _nan_to_none(self.bias),
            "shift_low": _nan_to_none(self.shift_low),
            "shift_high": _nan_to_none(self.shift_high),
            "percentile_low": _nan_to_none(self.percentile_low),
            "percentile_high": _nan_to_none(self.percentile_high),
            "topk_freq": [float(f) for f in self.topk_freq],
        }


def _nan_to_none(values) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def bootstrap_shift(
    feats: Sequence[torch.Tensor],
    *,
    window: int = 5,
    top_k: int = 5,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    cka_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> BootstrapResult:
    """Bootstrap the shift scores by resampling examples with replacement.

    Each resample draws ``n`` row indices with replacement (the same rows for every layer, so
    a row stays one prompt), recomputes the CKA matrix and the shift scores from the already
    captured states, and records which layers land in the ``top_k`` lowest. No forward pass
    is repeated. The interval is bias-adjusted; see :class:`BootstrapResult`.

    Args:
        feats: one (n, d_l) tensor per layer, rows aligned across layers.
        window: shift-score window, see :func:`shift_scores`.
        top_k: ``k`` for the top-k frequencies.
        n_boot: number of resamples, at least 1.
        seed: seed of the ``torch.Generator`` drawing the indices; equal seeds give equal
            results.
        ci: interval coverage in (0, 1).
        cka_fn: estimator applied to each resample (a list of (n, d_l) tensors to an
            (n_layers, n_layers) matrix). ``None`` uses the full-batch biased linear CKA,
            computed by indexing Gram matrices formed once, ``k[idx][:, idx]``.

    Returns:
        A :class:`BootstrapResult`.

    Raises:
        ValueError: on an invalid ``n_boot``, ``ci``, ``window`` or ``top_k``, or fewer than
            two examples.

    Note:
        The default estimator holds one (n, n) float64 Gram per layer, ``8 n_layers n^2``
        bytes (14 MB for 18 layers and 300 prompts).
    """
    fn = "bootstrap_shift"
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"{fn}: n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"{fn}: ci must be in (0, 1), got {ci!r}")
    if len(feats) == 0:
        raise ValueError(f"{fn}: feats must hold at least one layer, got none")
    n = int(feats[0].shape[0])
    if n < 2 or any(int(f.shape[0]) != n for f in feats):
        raise ValueError(
            f"{fn}: feats must have the same number (>= 2) of rows in every "
            f"layer, got {[int(f.shape[0]) for f in feats]}"
        )
    n_layers = len(feats)
    check_window(window, n_layers, fn)
    n_scored = n_layers - 2 * (window // 2)
    if (
        isinstance(top_k, bool)
        or not isinstance(top_k, (int, np.integer))
        or not 1 <= top_k <= n_scored
    ):
        raise ValueError(
            f"{fn}: top_k must be between 1 and the number of scored layers "
            f"({n_scored}), got {top_k!r}"
        )

    grams = None
    if cka_fn is None:
        grams = torch.stack([f.to(torch.float64) @ f.to(torch.float64).T for f in feats])
        full = shift_scores(biased_cka_from_grams(grams), window)
    else:
        full = shift_scores(cka_fn(list(feats)), window)
    gen = torch.Generator().manual_seed(int(seed))
    samples = np.full((n_boot, n_layers), np.nan)
    counts = np.zeros(n_layers)
    for b in range(n_boot):
        idx = torch.randint(n, (n,), generator=gen)
        if grams is not None:
            m = biased_cka_from_grams(grams[:, idx][:, :, idx])
        else:
            m = cka_fn([f[idx] for f in feats])
        delta = shift_scores(m, window)
        samples[b] = delta
        order = rank_layers(delta)
        counts[order[:top_k]] += 1
    alpha = (1.0 - ci) / 2.0
    scored = np.isfinite(samples).any(0)
    low = np.full(n_layers, np.nan)
    high = np.full(n_layers, np.nan)
    mean = np.full(n_layers, np.nan)
    if scored.any():
        cols = samples[:, scored]
        low[scored] = np.nanpercentile(cols, 100 * alpha, axis=0)
        high[scored] = np.nanpercentile(cols, 100 * (1 - alpha), axis=0)
        mean[scored] = np.nanmean(cols, axis=0)
    bias = mean - full
    return BootstrapResult(
        n_boot=int(n_boot),
        seed=int(seed),
        ci=float(ci),
        top_k=int(top_k),
        shift=full,
        shift_mean=mean,
        bias=bias,
        shift_low=low - bias,
        shift_high=high - bias,
        percentile_low=low,
        percentile_high=high,
        topk_freq=counts / n_boot,
        samples=samples,
    )


class StateScores:
    """Streaming block influence and angular distance over batches of block states.

    Both scores are means over examples of a per-example quantity, so they accumulate batch by
    batch without holding the states. Cosines are taken in float64.

    Args:
        n_layers: number of blocks.
        angular_n: block span ``n`` of the angular distance, ``1 <= n <= n_layers``.
    """

    def __init__(self, n_layers: int, angular_n: int = 1):
        if (
            isinstance(angular_n, bool)
            or not isinstance(angular_n, (int, np.integer))
            or not 1 <= angular_n <= n_layers
        ):
            raise ValueError(
                f"StateScores: angular_n must be an integer between 1 and "
                f"n_layers ({n_layers}), got {angular_n!r}"
            )
        self.n_layers = int(n_layers)
        self.angular_n = int(angular_n)
        self._bi_sum = np.zeros(self.n_layers)
        self._ad_sum = np.zeros(self.n_layers - self.angular_n + 1)
        self.count = 0

    @staticmethod
    def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.to(torch.float64), b.to(torch.float64)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
        return cos.clamp(-1.0, 1.0)

    def update(self, block_input: torch.Tensor, states: Sequence[torch.Tensor]) -> None:
        """Add one batch.

        Args:
            block_input: (b, d) input of block 0 (the embedding output).
            states: one (b, d) output per block, in block order.
        """
        if len(states) != self.n_layers:
            raise ValueError(
                f"StateScores.update: states must hold {self.n_layers} layers, got {len(states)}"
            )
        seq = [block_input, *states]
        for layer in range(self.n_layers):
            self._bi_sum[layer] += float((1.0 - self._cos(seq[layer], seq[layer + 1])).sum())
        for layer in range(len(self._ad_sum)):
            cos = self._cos(seq[layer], seq[layer + self.angular_n])
            self._ad_sum[layer] += float((torch.arccos(cos) / math.pi).sum())
        self.count += int(block_input.shape[0])

    def block_influence(self) -> np.ndarray:
        """(n_layers,) mean ``1 - cos(input, output)`` of every block."""
        if self.count == 0:
            return np.full(self.n_layers, np.nan)
        return self._bi_sum / self.count

    def angular_distance(self) -> np.ndarray:
        """(n_layers,) mean angular distance over blocks ``l .. l + n - 1``; NaN past the end."""
        out = np.full(self.n_layers, np.nan)
        if self.count:
            out[: len(self._ad_sum)] = self._ad_sum / self.count
        return out


def block_influence(block_input: torch.Tensor, states: Sequence[torch.Tensor]) -> np.ndarray:
    """Block influence ``1 - cos(h_in(l), h_out(l))`` per block, mean over examples.

    Args:
        block_input: (n, d) input of block 0.
        states: one (n, d) output per block.

    Returns:
        (n_layers,) float64 array.
    """
    acc = StateScores(len(states))
    acc.update(block_input, states)
    return acc.block_influence()


def angular_distance(
    block_input: torch.Tensor, states: Sequence[torch.Tensor], n: int = 1
) -> np.ndarray:
    """Angular distance ``arccos(cos(h_in(l), h_in(l + n))) / pi``, mean over examples.

    Args:
        block_input: (n_examples, d) input of block 0.
        states: one (n_examples, d) output per block.
        n: number of blocks spanned.

    Returns:
        (n_layers,) float64 array, NaN for the last ``n - 1`` blocks.
    """
    acc = StateScores(len(states), angular_n=n)
    acc.update(block_input, states)
    return acc.angular_distance()


def rank_correlation(a, b) -> float:
    """Spearman rank correlation over the layers where both scores are finite.

    Returns:
        The correlation, or NaN with fewer than three common layers or a constant score.
    """
    from scipy.stats import spearmanr

    x, y = _as_vector(a, "rank_correlation", "a"), _as_vector(b, "rank_correlation", "b")
    if x.shape != y.shape:
        raise ValueError(
            f"rank_correlation: a and b must have the same length, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan
    return float(spearmanr(x[keep], y[keep]).statistic)


def curve_correlation(a, b) -> dict[str, float | int]:
    """Pearson and Spearman correlation of two per-layer curves over their common layers.

    Used to compare the shift curves of two prompt sets on one model (data-obliviousness).

    Returns:
        ``{"pearson": r, "spearman": rho, "n_layers": m}``; NaN correlations when fewer than
        three layers are finite in both or a curve is constant there.
    """
    from scipy.stats import pearsonr

    x, y = _as_vector(a, "curve_correlation", "a"), _as_vector(b, "curve_correlation", "b")
    if x.shape != y.shape:
        raise ValueError(
            f"curve_correlation: a and b must have the same length, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    keep = np.isfinite(x) & np.isfinite(y)
    pearson = math.nan
    if keep.sum() >= 3 and np.ptp(x[keep]) > 0 and np.ptp(y[keep]) > 0:
        pearson = float(pearsonr(x[keep], y[keep]).statistic)
    return {"pearson": pearson, "spearman": rank_correlation(x, y), "n_layers": int(keep.sum())}
