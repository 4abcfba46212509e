"""Drop-in replacement for the ``pytorch-cka`` package (imported as ``cka``).

The package offers Gram-level HSIC on stacked Gram matrices, CKA from stored features, and a
model-level comparison that hooks layers of two networks and accumulates the unbiased HSIC over
the batches of a data loader (the minibatch CKA of Nguyen et al., arXiv:2010.15327). Changing the
import moves all of it onto the critlayers engine::

    from cka import compute_cka, cka_from_features, hsic                     # before
    from critlayers.compat.pytorch_cka import compute_cka, cka_from_features, hsic  # after

Estimator, for layer ``i`` of the first model and ``j`` of the second, over batches ``b``::

    CKA_ij = sum_b HSIC_u(K_ib, L_jb) / sqrt(sum_b HSIC_u(K_ib, K_ib) * sum_b HSIC_u(L_jb, L_jb))

with ``HSIC_u(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
/ (n (n - 3))`` (Song et al. 2012, arXiv:0704.2668; ``K~`` is ``K`` with a zeroed diagonal).

Note:
    The package clamps every CKA value into [0, 1] and replaces a zero denominator by ``1e-6``.
    Both hide real information: the unbiased estimate of two unrelated representations is
    legitimately slightly negative, and a zero self-HSIC means a constant layer, for which CKA is
    undefined. Here values are returned unclamped, and a constant layer gives NaN with one
    ``RuntimeWarning``; on every pair where the package's clamp and floor do not act, the numbers
    agree. Further differences: results are float64 (the package accumulated in float32 on the
    model's device, losing digits over many batches); a hooked layer that does not run in a
    forward pass raises ``RuntimeError`` naming it (the package failed with a bare ``KeyError`` or
    silently reused nothing); ``verbose`` logs the running mean at INFO level through
    :mod:`logging` instead of printing. Plotting helpers are not part of this module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import critlayers as cl
from critlayers.compat._common import ActivationRecorder, as_tensor, flatten_examples

__all__ = ["hsic", "hsic_cross", "cka_from_features", "compute_cka", "CKA"]

logger = logging.getLogger(__name__)

_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "pixel_values")


def _check_grams(grams_x, grams_y, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gy = as_tensor(grams_x, caller, "grams_x"), as_tensor(grams_y, caller, "grams_y")
    if gx.dim() != 3 or gy.dim() != 3:
        raise ValueError(
            f"{caller}: grams_x and grams_y must be 3-d (n_layers, n, n), got shapes "
            f"{tuple(gx.shape)} and {tuple(gy.shape)}"
        )
    if gx.shape[1] != gx.shape[2] or gy.shape[1] != gy.shape[2]:
        raise ValueError(
            f"{caller}: Gram matrices must be square, got shapes {tuple(gx.shape)} and "
            f"{tuple(gy.shape)}"
        )
    if gx.shape[1] != gy.shape[1]:
        raise ValueError(
            f"{caller}: grams_x and grams_y must share the example count, got {gx.shape[1]} "
            f"and {gy.shape[1]}"
        )
    if gx.shape[1] <= 3:
        raise ValueError(f"{caller}: the unbiased HSIC needs n > 3, got n={gx.shape[1]}")
    return gx, gy


def hsic(grams_x, grams_y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unbiased HSIC of every pair of stacked Gram matrices, and of each with itself.

    Args:
        grams_x: Gram matrices of the first set of layers, shape (n_layers_x, n, n).
        grams_y: Gram matrices of the second set, shape (n_layers_y, n, n).

    Returns:
        ``(hsic_xy, hsic_xx, hsic_yy)``: float64 tensors of shapes (n_layers_x, n_layers_y),
        (n_layers_x,) and (n_layers_y,), each value ``HSIC_u`` as in the module docstring.

    Raises:
        ValueError: if the inputs are not 3-d, not square, disagree on ``n``, or have ``n <= 3``.
    """
    gx, gy = _check_grams(grams_x, grams_y, "hsic")
    return cl.gram_hsic_matrix(gx, gy, unbiased=True)


def hsic_cross(grams_x, grams_y) -> torch.Tensor:
    """Unbiased HSIC of every (x, y) pair of stacked Gram matrices.

    Args:
        grams_x: shape (n_layers_x, n, n).
        grams_y: shape (n_layers_y, n, n).

    Returns:
        ``hsic_xy``, float64, shape (n_layers_x, n_layers_y).

    Raises:
        ValueError: as :func:`hsic`.
    """
    gx, gy = _check_grams(grams_x, grams_y, "hsic_cross")
    return cl.gram_hsic_matrix(gx, gy, unbiased=True)[0]


def _feature_list(feats, caller: str, name: str) -> list[torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        if feats.dim() == 2:
            return [feats.detach()]
        if feats.dim() == 3:
            return list(feats.detach())
        raise ValueError(f"{caller}: {name} must be (n, d) or (n_layers, n, d), got "
                         f"shape {tuple(feats.shape)}")
    return [flatten_examples(as_tensor(f, caller, name), caller, name) for f in feats]


def cka_from_features(features_x, features_y) -> torch.Tensor:
    """Unbiased linear CKA between every pair of stored feature matrices.

    Args:
        features_x: one (n, d) tensor, an (n_layers_x, n, d) tensor, or a sequence of (n, d_i)
            tensors.
        features_y: the same forms for the second set.

    Returns:
        float64 CKA matrix, shape (n_layers_x, n_layers_y); not clamped (see the module Note).
    """
    fx = _feature_list(features_x, "cka_from_features", "features_x")
    fy = _feature_list(features_y, "cka_from_features", "features_y")
    n = {f.shape[0] for f in fx + fy}
    if len(n) != 1:
        raise ValueError(f"cka_from_features: all features must share n, got {sorted(n)}")
    if n.pop() <= 3:
        raise ValueError("cka_from_features: the unbiased HSIC needs more than 3 examples")
    return cl.cka_matrix(fx, fy, kernel="linear", unbiased=True)


def _progress(iterable, enabled: bool, total):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="Computing CKA")


class CKA:
    """Model-level minibatch CKA, used as a context manager that owns the forward hooks.

    Args:
        model1: first network; ``DataParallel`` wrappers are unwrapped.
        model2: second network (may be ``model1`` itself: one forward pass then serves both).
        layers: layers of ``model1``, by name or by index into ``named_modules()`` (the root
            excluded, negative indices from the end); ``None`` takes every submodule.
        model2_layers: layers of ``model2``; defaults to ``layers``.
        device: where the models run; ``None`` picks CUDA, then MPS, then CPU. The models are moved
            there, as the package did.

    Example::

        with CKA(model1, model2, layers=["block.0", "block.1"]) as cka:
            matrix = cka.compare(loader)

    Raises:
        ValueError: for a layer name not found; ``IndexError`` for an index out of range;
            ``TypeError`` for a layer given as neither str nor int.
    """

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        layers: Sequence[str | int] | None = None,
        model2_layers: Sequence[str | int] | None = None,
        device=None,
    ) -> None:
        self.model1 = _unwrap(model1)
        self.model2 = _unwrap(model2)
        if model2_layers is None:
            model2_layers = layers
        self.model1_layer_to_module = _resolve_layers(self.model1, layers, "model1")
        self.model2_layer_to_module = _resolve_layers(self.model2, model2_layers, "model2")
        self._is_same_model = self.model1 is self.model2
        self._training = (self.model1.training, self.model2.training)
        self.device = torch.device(device) if device else _default_device()
        self.model1 = self.model1.to(self.device)
        self.model2 = self.model2.to(self.device)
        if self._is_same_model:
            shared = {**self.model1_layer_to_module, **self.model2_layer_to_module}
            self._recorders = [ActivationRecorder(shared, "model1")]
        else:
            self._recorders = [
                ActivationRecorder(self.model1_layer_to_module, "model1"),
                ActivationRecorder(self.model2_layer_to_module, "model2"),
            ]
        self._entered = False

    def __enter__(self) -> CKA:
        for recorder in self._recorders:
            recorder.attach()
        self.model1.eval()
        self.model2.eval()
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for recorder in self._recorders:
            recorder.detach()
        self.model1.train(self._training[0])
        self.model2.train(self._training[1])
        self._entered = False
        return False

    def _batch_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for recorder in self._recorders:
            recorder.clear()
        self.model1(x)
        if self._is_same_model:
            (recorder,) = self._recorders
            named = dict(zip(recorder.modules, recorder.collect(), strict=True))
            return ([named[name] for name in self.model1_layer_to_module],
                    [named[name] for name in self.model2_layer_to_module])
        self.model2(x)
        return self._recorders[0].collect(), self._recorders[1].collect()

    def compare(self, dataloader, progress: bool = True, verbose: bool = False) -> torch.Tensor:
        """Minibatch CKA of every layer pair over one pass of ``dataloader``.

        Args:
            dataloader: iterable of batches: a tensor, a tuple or list whose first item is the
                input, or a dict holding one of the keys ``input``, ``inputs``, ``x``, ``image``,
                ``images``, ``input_ids``, ``pixel_values``. Each batch needs more than 3 examples.
            progress: show a tqdm bar when tqdm is installed.
            verbose: log the running mean CKA after every batch (INFO level).

        Returns:
            float64 CKA matrix, shape (len(model1 layers), len(model2 layers)).

        Raises:
            RuntimeError: outside the ``with`` block, or when a hooked layer did not run.
            ValueError: for a batch of 3 examples or fewer, or a dict batch without a known key.
        """
        if not self._entered:
            raise RuntimeError("CKA.compare: call it inside `with CKA(...) as cka:`")
        names1, names2 = list(self.model1_layer_to_module), list(self.model2_layer_to_module)
        within = self._is_same_model and names1 == names2
        state = (cl.MinibatchCKA(len(names1), unbiased=True) if within
                 else cl.MinibatchCKA(len(names1), len(names2), unbiased=True))
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        with torch.no_grad():
            for index, batch in enumerate(_progress(dataloader, progress, total)):
                x = _extract_input(batch)
                if x.shape[0] <= 3:
                    raise ValueError(
                        f"CKA.compare: the unbiased HSIC needs more than 3 examples per batch, "
                        f"got {x.shape[0]} in batch {index}; increase the batch size"
                    )
                feats1, feats2 = self._batch_features(x.to(self.device))
                if within:
                    state.update(feats1)
                else:
                    state.update(feats1, feats2)
                if verbose:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        running = state.compute()
                    logger.info("batch %d: mean CKA %.4f", index + 1, float(running.nanmean()))
        return state.compute()

    _compare = compare


def compute_cka(
    model1: nn.Module,
    model2: nn.Module,
    *dataloaders,
    layers: Sequence[str | int] | None = None,
    model2_layers: Sequence[str | int] | None = None,
    device=None,
    progress: bool = True,
    verbose: bool = False,
) -> list[torch.Tensor]:
    """Minibatch CKA between the layers of two models, once per data loader.

    Args:
        model1: first network.
        model2: second network (may be the same object).
        *dataloaders: one or more loaders (or a single list or tuple of them); see
            :meth:`CKA.compare` for the batch forms.
        layers: layers of ``model1`` by name or index; ``None`` takes every submodule.
        model2_layers: layers of ``model2``; defaults to ``layers``.
        device: where to run; ``None`` picks CUDA, then MPS, then CPU.
        progress: show a progress bar per loader.
        verbose: log the running mean CKA after every batch.

    Returns:
        One float64 CKA matrix (n_layers_1, n_layers_2) per loader, in order.

    Raises:
        ValueError: if no loader is given.
    """
    if len(dataloaders) == 1 and isinstance(dataloaders[0], (list, tuple)):
        dataloaders = tuple(dataloaders[0])
    if not dataloaders:
        raise ValueError("compute_cka: at least one dataloader is required, got none")
    session = CKA(model1, model2, layers=layers, model2_layers=model2_layers, device=device)
    with session:
        return [session.compare(loader, progress=progress, verbose=verbose)
                for loader in dataloaders]


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _resolve_layers(model: nn.Module, layers, owner: str) -> dict[str, nn.Module]:
    by_name = {name: module for name, module in model.named_modules() if name}
    names = list(by_name)
    if layers is None:
        if len(names) > 150:
            warnings.warn(
                f"{owner} has {len(names)} submodules; pass layers explicitly to compare fewer",
                stacklevel=3,
            )
        return by_name
    resolved: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise TypeError(
                f"CKA: layers of {owner} must be str or int, got {type(layer).__name__} "
                f"({layer!r})"
            )
        if isinstance(layer, str):
            if layer not in by_name:
                raise ValueError(
                    f"CKA: layer {layer!r} not found in {owner}; see {owner}.named_modules()"
                )
            name = layer
        else:
            index = layer if layer >= 0 else len(names) + layer
            if not 0 <= index < len(names):
                raise IndexError(
                    f"CKA: layer index {layer} out of range for {owner} with {len(names)} "
                    f"submodules (valid: {-len(names)} to {len(names) - 1})"
                )
            name = names[index]
        resolved.setdefault(name, by_name[name])
    if not resolved:
        raise ValueError(f"CKA: layers of {owner} must name at least one module, got {layers!r}")
    return resolved


def _extract_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"CKA.compare: a dict batch needs one of the keys {list(_INPUT_KEYS)}, got "
            f"{list(batch)}"
        )
    raise TypeError(f"CKA.compare: unsupported batch type {type(batch).__name__}")
