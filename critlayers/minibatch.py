"""Accumulators that stream activations through the CKA engine in bounded memory.

* :class:`MinibatchCKA`: minibatch CKA (Nguyen, Raghu, Kornblith 2021, arXiv:2010.15327). Each
  batch contributes its own HSIC estimate for every pair of layers; the sums are kept in
  float64 and ``CKA = sum HSIC_xy / sqrt(sum HSIC_xx * sum HSIC_yy)``. With the unbiased
  estimator (the default) this is consistent as the number of batches grows; a single batch
  equals the unbiased CKA of that batch.
* :class:`StreamingLinearCKA`: the exact full-data linear CKA, streamed in the d x d
  feature-space form. Rows arrive in any batches; the result equals :func:`critlayers.cka_matrix`
  on all rows at once.

Both can be merged (data-parallel workers), reduced over ``torch.distributed`` and saved with
``state_dict`` to resume a long stream.
"""

from __future__ import annotations

import torch

from . import functional as _cka
from ._validation import as_feature_list, check_choice, check_examples, check_positive

__all__ = ["MinibatchCKA", "StreamingLinearCKA"]

_ops = torch.ops.critlayers


def _check_count(fn: str, arg: str, count, allow_none: bool = False) -> None:
    if count is None and allow_none:
        return
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{fn}: {arg} must be a positive integer, got {count!r}")


def _batch_layers(fn: str, feats, feats_y, n_layers: int,
                  n_layers_y: int | None) -> tuple[list[torch.Tensor], int]:
    """Checks one batch against the accumulator's layer counts; returns the x layers followed
    by the y layers, and the number of rows."""
    xs = as_feature_list(fn, "feats", feats)
    if len(xs) != n_layers:
        raise ValueError(f"{fn}: feats has {len(xs)} layers but the accumulator was built for "
                         f"n_layers = {n_layers}")
    if n_layers_y is None:
        if feats_y is not None:
            raise ValueError(f"{fn}: feats_y was given but the accumulator compares x with "
                             "itself; build it with n_layers_y to compare two layer sets")
        return xs, xs[0].shape[0]
    if feats_y is None:
        raise ValueError(f"{fn}: feats_y is required (n_layers_y = {n_layers_y})")
    ys = as_feature_list(fn, "feats_y", feats_y)
    if len(ys) != n_layers_y:
        raise ValueError(f"{fn}: feats_y has {len(ys)} layers but the accumulator was built for "
                         f"n_layers_y = {n_layers_y}")
    if ys[0].shape[0] != xs[0].shape[0]:
        raise ValueError(f"{fn}: feats_y has {ys[0].shape[0]} examples but feats has "
                         f"{xs[0].shape[0]}; both must hold the same batch")
    return xs + ys, xs[0].shape[0]


def _map_tensors(state: dict, fn) -> dict:
    """A copy of a state dict with ``fn`` applied to every tensor, in lists too."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, list):
            return [one(t) for t in v]
        return v

    return {k: one(v) for k, v in state.items()}


def _all_reduce(tensors: list[torch.Tensor], group) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first")
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class MinibatchCKA:
    """Minibatch CKA over all pairs of layers, accumulated in float64.

    Args:
        n_layers: number of layers of x given to each :meth:`update`.
        n_layers_y: number of layers of a second set y (another model); None compares x with
            itself.
        unbiased: per-batch unbiased HSIC (Song et al. 2012), as Nguyen et al.; False uses the
            biased estimator per batch.
        kernel: ``'linear'`` or ``'rbf'``.
        threshold, sigma: RBF bandwidth, as in :func:`critlayers.hsic_matrix`.
        device: where the float64 sums live (default: the device of the first batch).

    Example:
        >>> acc = MinibatchCKA(n_layers=3)
        >>> for _ in range(4):
        ...     x = torch.randn(64, 16)
        ...     acc.update([x, x + 0.1 * torch.randn(64, 16), torch.randn(64, 8)])
        >>> acc.compute().shape
        torch.Size([3, 3])

    Note:
        With the RBF kernel and the median rule, each batch gets its own bandwidth. Batches
        may differ in size; each contributes its normalised HSIC estimate.
    """

    def __init__(self, n_layers: int, n_layers_y: int | None = None, *, unbiased: bool = True,
                 kernel: str = "linear", threshold: float = 1.0, sigma: float | None = None,
                 device: torch.device | str | None = None) -> None:
        fn = "critlayers.MinibatchCKA"
        _check_count(fn, "n_layers", n_layers)
        _check_count(fn, "n_layers_y", n_layers_y, allow_none=True)
        check_choice(fn, "kernel", kernel, ("linear", "rbf"))
        check_positive(fn, "threshold", threshold)
        check_positive(fn, "sigma", sigma, allow_none=True)
        self.n_layers = n_layers
        self.n_layers_y = n_layers_y
        self.unbiased = bool(unbiased)
        self.kernel = kernel
        self.threshold = threshold
        self.sigma = sigma
        self._device = None if device is None else torch.device(device)
        self.reset()

    @property
    def _n_total(self) -> int:
        return self.n_layers + (self.n_layers_y or 0)

    def reset(self) -> None:
        """Forgets every batch seen."""
        self._sums: torch.Tensor | None = None
        self.n_batches = 0
        self.n_examples = 0

    def _state(self, device: torch.device) -> torch.Tensor:
        if self._sums is None:
            self._sums = torch.zeros(self._n_total, self._n_total, dtype=torch.float64,
                                     device=self._device or device)
        return self._sums

    def update(self, feats, feats_y=None) -> None:
        """Adds one minibatch.

        Args:
            feats: n_layers tensors (b, d_l) (or one (n_layers, b, d) tensor) for the same b
                examples.
            feats_y: n_layers_y tensors (b, d_l) for the same examples, when comparing two
                layer sets.
        """
        fn = "critlayers.MinibatchCKA.update"
        everything, b = _batch_layers(fn, feats, feats_y, self.n_layers, self.n_layers_y)
        check_examples(fn, b, self.unbiased)
        state = self._state(everything[0].device)
        if state.device != everything[0].device:
            everything = [x.to(state.device) for x in everything]
        gammas = (_cka._gammas(fn, everything, self.threshold, self.sigma, self.n_layers)
                  if self.kernel == "rbf" else [])
        _cka._run(fn, _ops.gram_hsic_accumulate, state, everything, self.kernel, gammas,
                  self.unbiased, _cka.default_tile(b), _cka._normaliser(b, self.unbiased),
                  n_x=self.n_layers, has_y=self.n_layers_y is not None)
        self.n_batches += 1
        self.n_examples += b

    def _blocks(self) -> _cka.HSIC:
        if self._sums is None:
            raise RuntimeError("critlayers.MinibatchCKA: no batch has been added yet; call "
                               "update() first")
        s = (self._sums + self._sums.T) / 2
        diag = s.diagonal()
        n_x = self.n_layers
        if self.n_layers_y is None:
            return _cka.HSIC(s, diag.clone(), diag.clone())
        return _cka.HSIC(s[:n_x, n_x:].clone(), diag[:n_x].clone(), diag[n_x:].clone())

    @property
    def hsic_xy(self) -> torch.Tensor:
        """(n_layers, n_layers_y) accumulated cross HSIC sums, float64."""
        return self._blocks().xy

    @property
    def hsic_xx(self) -> torch.Tensor:
        """(n_layers,) accumulated self-HSIC sums of x, float64."""
        return self._blocks().xx

    @property
    def hsic_yy(self) -> torch.Tensor:
        """(n_layers_y,) accumulated self-HSIC sums of y, float64."""
        return self._blocks().yy

    def compute(self) -> torch.Tensor:
        """The (n_layers, n_layers_y) CKA matrix, float64; NaN for constant layers."""
        h = self._blocks()
        out = _cka.cka_from_hsic(h.xy, h.xx, h.yy, fn="critlayers.MinibatchCKA.compute")
        if self.n_layers_y is None:
            out = (out + out.T) / 2
            out.diagonal()[h.xx > 0] = 1.0
        return out

    def _check_compatible(self, other: MinibatchCKA) -> None:
        mine = (self.n_layers, self.n_layers_y, self.unbiased, self.kernel)
        theirs = (other.n_layers, other.n_layers_y, other.unbiased, other.kernel)
        if mine != theirs:
            raise ValueError(f"critlayers.MinibatchCKA.merge: accumulators differ "
                             f"(n_layers, n_layers_y, unbiased, kernel) = {mine} vs {theirs}")

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Adds the batches of ``other`` (e.g. another worker's) into this one; returns self."""
        self._check_compatible(other)
        if other._sums is not None:
            self._state(other._sums.device).add_(other._sums.to(self._state(
                other._sums.device).device))
        self.n_batches += other.n_batches
        self.n_examples += other.n_examples
        return self

    __iadd__ = merge

    def all_reduce(self, group=None) -> None:
        """Sums the accumulators of all ranks of ``torch.distributed`` in place.

        Every rank must have called :meth:`update` at least once, or have the sums allocated.
        """
        state = self._state(self._device or torch.device("cpu"))
        counts = torch.tensor([self.n_batches, self.n_examples], dtype=torch.float64,
                              device=state.device)
        _all_reduce([state, counts], group)
        self.n_batches, self.n_examples = int(counts[0]), int(counts[1])

    def state_dict(self) -> dict:
        """Everything needed to resume: settings, sums and counts (tensors on the CPU)."""
        return {
            "kind": "MinibatchCKA",
            "n_layers": self.n_layers,
            "n_layers_y": self.n_layers_y,
            "unbiased": self.unbiased,
            "kernel": self.kernel,
            "threshold": self.threshold,
            "sigma": self.sigma,
            "sums": None if self._sums is None else self._sums.detach().cpu().clone(),
            "n_batches": self.n_batches,
            "n_examples": self.n_examples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output; the settings must match this accumulator."""
        settings = ("n_layers", "n_layers_y", "unbiased", "kernel")
        if state.get("kind") != "MinibatchCKA" or any(
                state.get(k) != getattr(self, k) for k in settings):
            raise ValueError("critlayers.MinibatchCKA.load_state_dict: the state was saved "
                             f"with {{{', '.join(f'{k}={state.get(k)!r}' for k in settings)}}}"
                             f" but this accumulator has "
                             f"{{{', '.join(f'{k}={getattr(self, k)!r}' for k in settings)}}}")
        sums = state["sums"]
        self._sums = None if sums is None else sums.to(self._device or sums.device,
                                                       torch.float64).clone()
        self.n_batches = int(state["n_batches"])
        self.n_examples = int(state["n_examples"])


class StreamingLinearCKA:
    """Exact full-data linear CKA, streamed in the feature-space form.

    For each pair of layers (a, b) it accumulates, over all rows seen, ``X_a^T X_b`` (d_a x d_b)
    together with column sums and row-norm statistics, all in float64, about a fixed shift per
    layer (the first batch's column means) so that float32 products see centred values. The
    biased estimator is then ``|X_a^T X_b - s_a s_b^T / n|_F^2 / (n - 1)^2``; the unbiased one
    is Song et al.'s expanded in features (see :func:`critlayers.functional.hsic_from_moments`). The
    result equals :func:`critlayers.cka_matrix` on all rows at once, at O(n d^2) cost instead of
    O(n^2 d), which is the better trade when n >> d.

    Args:
        n_layers: layers of x per update. n_layers_y: layers of a second set y, or None.
        unbiased: the unbiased estimator instead of the biased one.
        shifts: optional per-layer shift vectors (x layers then y layers); workers that will
            be merged must share them. Default: the first batch's column means.
        device: where the float64 state lives (default: the first batch's device).

    Note:
        Memory is ``8 * sum over pairs of d_a * d_b`` bytes: for 18 layers of width 640, all
        171 pairs take 0.56 GB. Batches need not have the same size.
    """

    def __init__(self, n_layers: int, n_layers_y: int | None = None, *, unbiased: bool = False,
                 shifts=None, device: torch.device | str | None = None) -> None:
        fn = "critlayers.StreamingLinearCKA"
        _check_count(fn, "n_layers", n_layers)
        _check_count(fn, "n_layers_y", n_layers_y, allow_none=True)
        self.n_layers = n_layers
        self.n_layers_y = n_layers_y
        self.unbiased = bool(unbiased)
        self._device = None if device is None else torch.device(device)
        self._pairs = _cka.feature_pairs(n_layers, n_layers_y)
        self._given_shifts = None
        if shifts is not None:
            self._given_shifts = [torch.as_tensor(s, dtype=torch.float64).flatten()
                                  for s in shifts]
            if len(self._given_shifts) != self._n_total:
                raise ValueError(f"{fn}: shifts must hold {self._n_total} vectors (one per "
                                 f"layer), got {len(self._given_shifts)}")
        self.reset()

    @property
    def _n_total(self) -> int:
        return self.n_layers + (self.n_layers_y or 0)

    def reset(self) -> None:
        """Forgets every row seen (keeps shifts given to the constructor)."""
        self.n_examples = 0
        self._state: dict | None = None

    def _allocate(self, feats: list[torch.Tensor]) -> dict:
        device = self._device or feats[0].device
        f64 = {"dtype": torch.float64, "device": device}
        if self._given_shifts is not None:
            for i, (s, x) in enumerate(zip(self._given_shifts, feats, strict=True)):
                if s.numel() != x.shape[1]:
                    raise ValueError(f"critlayers.StreamingLinearCKA: shifts[{i}] has "
                                     f"{s.numel()} entries but layer {i} has width {x.shape[1]}")
            shifts = [s.to(device) for s in self._given_shifts]
        else:
            shifts = [_cka._chunked_mean(x).to(device) for x in feats]
        widths = [x.shape[1] for x in feats]
        return {
            "widths": widths,
            "shifts": shifts,
            "cross": [torch.zeros(widths[a], widths[b], **f64) for a, b in self._pairs],
            "va": [torch.zeros(widths[a], **f64) for a, _ in self._pairs],
            "vb": [torch.zeros(widths[b], **f64) for _, b in self._pairs],
            "colsum": [torch.zeros(w, **f64) for w in widths],
            "qq": torch.zeros(len(widths), len(widths), **f64),
            "qsum": torch.zeros(len(widths), **f64),
        }

    def update(self, feats, feats_y=None) -> None:
        """Adds a batch of rows: n_layers tensors (b, d_l) (and n_layers_y for y)."""
        fn = "critlayers.StreamingLinearCKA.update"
        everything, rows = _batch_layers(fn, feats, feats_y, self.n_layers, self.n_layers_y)
        if self._state is None:
            self._state = self._allocate(everything)
        st = self._state
        widths = [x.shape[1] for x in everything]
        if widths != st["widths"]:
            raise ValueError(f"{fn}: layer widths {widths} differ from the first batch's "
                             f"{st['widths']}")
        device = st["qq"].device
        if everything[0].device != device:
            everything = [x.to(device) for x in everything]
        _cka._run(fn, _ops.feature_moments_accumulate, everything, st["shifts"],
                  [a for a, _ in self._pairs], [b for _, b in self._pairs], st["cross"],
                  st["va"], st["vb"], st["colsum"], st["qq"], st["qsum"],
                  _cka.feature_chunk_rows(everything), n_x=self.n_layers,
                  has_y=self.n_layers_y is not None)
        self.n_examples += rows

    def hsic(self) -> _cka.HSIC:
        """HSIC of all pairs over every row seen: (xy, xx, yy), float64."""
        fn = "critlayers.StreamingLinearCKA.hsic"
        if self._state is None:
            raise RuntimeError(f"{fn}: no rows have been added yet; call update() first")
        check_examples(fn, self.n_examples, self.unbiased)
        st = self._state
        values = {}
        for p, (a, b) in enumerate(self._pairs):
            values[(a, b)] = _cka.hsic_from_moments(
                self.n_examples, self.unbiased, st["cross"][p], st["colsum"][a],
                st["colsum"][b], st["va"][p], st["vb"][p], float(st["qq"][a, b]),
                float(st["qsum"][a]), float(st["qsum"][b]))
        return _cka.assemble_hsic(values, self.n_layers, self.n_layers_y, st["qq"].device)

    def compute(self) -> torch.Tensor:
        """The (n_layers, n_layers_y) CKA matrix over every row seen, float64."""
        h = self.hsic()
        out = _cka.cka_from_hsic(h.xy, h.xx, h.yy, fn="critlayers.StreamingLinearCKA.compute")
        if self.n_layers_y is None:
            out = (out + out.T) / 2
            out.diagonal()[h.xx > 0] = 1.0
        return out

    def _tensors(self) -> list[torch.Tensor]:
        st = self._state
        return [*st["cross"], *st["va"], *st["vb"], *st["colsum"], st["qq"], st["qsum"]]

    def merge(self, other: StreamingLinearCKA) -> StreamingLinearCKA:
        """Adds the rows of ``other`` into this one; both must use the same shifts."""
        fn = "critlayers.StreamingLinearCKA.merge"
        if (self.n_layers, self.n_layers_y, self.unbiased) != (
                other.n_layers, other.n_layers_y, other.unbiased):
            raise ValueError(f"{fn}: accumulators differ in n_layers, n_layers_y or unbiased")
        if other._state is None:
            return self
        if self._state is None:
            self._state = _map_tensors(other._state, torch.clone)
            self.n_examples = other.n_examples
            return self
        if not all(torch.equal(a, b.to(a.device)) for a, b in
                   zip(self._state["shifts"], other._state["shifts"], strict=True)):
            raise ValueError(f"{fn}: the accumulators use different shifts; build both with the "
                             "same shifts= to merge them")
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.add_(theirs.to(mine.device))
        self.n_examples += other.n_examples
        return self

    __iadd__ = merge

    def all_reduce(self, group=None) -> None:
        """Sums the moments of all ranks of ``torch.distributed`` in place.

        Every rank must have seen at least one batch and all must share ``shifts``.
        """
        if self._state is None:
            raise RuntimeError("critlayers.StreamingLinearCKA.all_reduce: no rows have been "
                               "added on this rank")
        count = torch.tensor([float(self.n_examples)], dtype=torch.float64,
                             device=self._state["qq"].device)
        _all_reduce([*self._tensors(), count], group)
        self.n_examples = int(count[0])

    def state_dict(self) -> dict:
        """Settings, moments and count, tensors on the CPU, to resume a long stream."""
        st = None
        if self._state is not None:
            st = _map_tensors(self._state, lambda t: t.detach().cpu().clone())
        return {"kind": "StreamingLinearCKA", "n_layers": self.n_layers,
                "n_layers_y": self.n_layers_y, "unbiased": self.unbiased,
                "n_examples": self.n_examples, "state": st}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` output; the settings must match."""
        mine = ("StreamingLinearCKA", self.n_layers, self.n_layers_y, self.unbiased)
        theirs = (state.get("kind"), state.get("n_layers"), state.get("n_layers_y"),
                  state.get("unbiased"))
        if mine != theirs:
            raise ValueError("critlayers.StreamingLinearCKA.load_state_dict: saved with "
                             f"(kind, n_layers, n_layers_y, unbiased) = {theirs}, expected "
                             f"{mine}")
        self.n_examples = int(state["n_examples"])
        st = state["state"]
        if st is None:
            self._state = None
            return
        device = self._device or torch.device("cpu")
        self._state = _map_tensors(st, lambda t: t.to(device).clone())
