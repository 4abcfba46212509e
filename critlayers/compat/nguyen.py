"""Drop-in replacement for the minibatch CKA metric of Nguyen, Raghu and Kornblith (2021).

"Do Wide and Deep Networks Learn the Same Things?" (arXiv:2010.15327) estimates CKA over a data set
too large for one Gram matrix by averaging the unbiased HSIC over minibatches. Its code is a
TensorFlow Keras metric; this module offers the same class on the critlayers engine, without
TensorFlow, accepting NumPy arrays or torch tensors::

    from cka_metric import MinibatchCKA               # before (TensorFlow code)
    from critlayers.compat.nguyen import MinibatchCKA  # after

For layers ``i`` of one model and ``j`` of the other (or of the same model), over batches ``b``::

    CKA_ij = sum_b HSIC_u(K_ib, L_jb) / sqrt(sum_b HSIC_u(K_ib, K_ib) * sum_b HSIC_u(L_jb, L_jb))

with ``HSIC_u`` the unbiased estimator of Song et al. (2012, arXiv:0704.2668) and ``K_ib`` the
linear Gram of layer ``i`` on batch ``b``. A single batch gives the debiased CKA of Kornblith et al.

Note:
    The paper defines the estimator with each batch's HSIC normalised by ``1 / (n_b (n_b - 3))``;
    the original code omitted that constant, which is harmless when every batch has the same size.
    This class follows the paper, so with a smaller last batch the two differ slightly (the original
    over-weights large batches by ``n_b (n_b - 3)``). Other differences: sums are accumulated in
    float64 (the original default was float32, whose sums of fourth powers of activations lose
    digits and can overflow on long runs); ``result`` returns a float64 torch tensor, which like a
    TensorFlow tensor offers ``.numpy()``; a batch of ``n <= 3`` examples, for which the unbiased
    estimator is undefined, raises ``ValueError`` instead of adding a meaningless term; a constant
    layer gives NaN with one ``RuntimeWarning``; a negative accumulated self-HSIC is reported as NaN
    rather than hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import critlayers as cl
from critlayers.compat._common import as_tensor, flatten_examples

__all__ = ["MinibatchCKA"]


def _layer_batch(activations, caller: str, name: str, n_layers: int) -> list[torch.Tensor]:
    if isinstance(activations, torch.Tensor) or not isinstance(activations, Sequence):
        activations = list(activations)
    if len(activations) != n_layers:
        raise ValueError(
            f"{caller}: {name} must hold one activation per layer ({n_layers}), got "
            f"{len(activations)}"
        )
    feats = [flatten_examples(as_tensor(a, caller, name), caller, name) for a in activations]
    sizes = {f.shape[0] for f in feats}
    if len(sizes) != 1:
        raise ValueError(f"{caller}: all layers in {name} must share one batch size, got {sizes}")
    n = sizes.pop()
    if n <= 3:
        raise ValueError(
            f"{caller}: the unbiased HSIC needs more than 3 examples per batch, got {n} in {name}"
        )
    return feats


class MinibatchCKA:
    """Accumulate unbiased linear HSIC over minibatches and report the CKA matrix.

    Args:
        num_layers: number of layers of the first (or only) model.
        num_layers2: number of layers of the second model; defaults to ``num_layers``.
        across_models: compare two models with :meth:`update_state_across_models`; otherwise all
            layer pairs of one model with :meth:`update_state`.
        dtype: accepted for signature compatibility and ignored; accumulation is float64.

    Raises:
        ValueError: if a layer count is not positive, or differs between the two sides of a
            single-model metric.
    """

    def __init__(
        self,
        num_layers: int,
        num_layers2: int | None = None,
        across_models: bool = False,
        dtype=None,
    ) -> None:
        if num_layers2 is None:
            num_layers2 = num_layers
        for name, value in (("num_layers", num_layers), ("num_layers2", num_layers2)):
            if int(value) != value or value < 1:
                raise ValueError(f"MinibatchCKA: {name} must be a positive int, got {value!r}")
        if not across_models and num_layers2 != num_layers:
            raise ValueError(
                "MinibatchCKA: without across_models both layer counts must match, got "
                f"num_layers={num_layers} and num_layers2={num_layers2}"
            )
        self.num_layers = int(num_layers)
        self.num_layers2 = int(num_layers2)
        self.across_models = bool(across_models)
        self._state = self._new_state()

    def _new_state(self):
        if self.across_models:
            return cl.MinibatchCKA(self.num_layers, self.num_layers2, unbiased=True)
        return cl.MinibatchCKA(self.num_layers, unbiased=True)

    def update_state(self, activations) -> None:
        """Add one batch of one model: every pair of its layers.

        Args:
            activations: one array per layer, each (n, ...) with the same ``n > 3``; trailing axes
                are flattened.

        Raises:
            ValueError: if the metric was built with ``across_models=True``, or on a shape error.
        """
        if self.across_models:
            raise ValueError(
                "MinibatchCKA.update_state: this metric was built with across_models=True; use "
                "update_state_across_models(activations1, activations2)"
            )
        self._state.update(_layer_batch(activations, "update_state", "activations",
                                        self.num_layers))

    def update_state_across_models(self, activations1, activations2) -> None:
        """Add one batch seen by two models: every (layer of model 1, layer of model 2) pair.

        Args:
            activations1: ``num_layers`` arrays, each (n, ...).
            activations2: ``num_layers2`` arrays, each (n, ...): the same examples, same order.

        Raises:
            ValueError: if the metric was built without ``across_models``, or on a shape error.
        """
        if not self.across_models:
            raise ValueError(
                "MinibatchCKA.update_state_across_models: this metric was built with "
                "across_models=False; pass across_models=True to compare two models"
            )
        caller = "update_state_across_models"
        feats1 = _layer_batch(activations1, caller, "activations1", self.num_layers)
        feats2 = _layer_batch(activations2, caller, "activations2", self.num_layers2)
        if feats1[0].shape[0] != feats2[0].shape[0]:
            raise ValueError(
                f"{caller}: activations1 and activations2 must hold the same examples, got batch "
                f"sizes {feats1[0].shape[0]} and {feats2[0].shape[0]}"
            )
        self._state.update(feats1, feats2)

    def result(self) -> torch.Tensor:
        """CKA of every layer pair over all batches so far, shape (num_layers, num_layers2)."""
        return self._state.compute()

    def reset_state(self) -> None:
        """Forget every batch seen so far."""
        self._state = self._new_state()

    reset_states = reset_state
