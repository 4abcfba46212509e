"""Helpers shared by the compatibility shims: input conversion and activation capture.

The model-level shims compare two networks by hooking named submodules, running both networks on
the same examples, and streaming each batch's activations into the critlayers engine. The
:class:`ActivationRecorder` here owns the hooks: it keeps one flattened activation per module per
forward pass, reports modules whose hook never fired, and warns when a module ran more than once
in one pass (only the last output is kept, which is rarely what the caller meant).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["ActivationRecorder", "as_tensor", "first_tensor", "flatten_examples"]


def as_tensor(x, caller: str, name: str) -> torch.Tensor:
    """Return ``x`` (a tensor or anything NumPy accepts) as a detached floating-point tensor.

    Args:
        x: array-like input.
        caller: public function name, used in the error message.
        name: argument name, used in the error message.

    Raises:
        TypeError: if ``x`` cannot be read as a numeric array.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        except TypeError as err:
            raise TypeError(
                f"{caller}: {name} must be a tensor or a numeric array, got {type(x).__name__}"
            ) from err
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def flatten_examples(x: torch.Tensor, caller: str, name: str) -> torch.Tensor:
    """Reshape ``x`` (n, ...) to (n, d) with ``d`` the product of the trailing sizes.

    Raises:
        ValueError: if ``x`` has no example axis (a 0-d tensor).
    """
    if x.dim() == 0:
        raise ValueError(f"{caller}: {name} must have an example axis, got a 0-d tensor")
    return x.reshape(x.shape[0], -1) if x.dim() != 2 else x


def first_tensor(output):
    """Pick the representation out of a module's output.

    A tensor is returned as is; for a tuple or list the first element is taken (the hidden state of
    most transformer blocks); an object with ``last_hidden_state`` (Hugging Face model outputs)
    gives that field. Anything else gives ``None``.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    return None


class ActivationRecorder:
    """Forward hooks that keep each named module's flattened output for one forward pass.

    Args:
        modules: mapping from the caller-facing layer name to the module to hook, in the order the
            rows (or columns) of the CKA matrix will follow.
        owner: short label for messages, for example ``"model1"``.
    """

    def __init__(self, modules: Mapping[str, nn.Module], owner: str) -> None:
        self.modules = dict(modules)
        self.owner = owner
        self.features: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned_repeat = False

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            feat = first_tensor(output)
            self._calls[name] = self._calls.get(name, 0) + 1
            if feat is None:
                return
            feat = feat.detach()
            if not feat.is_floating_point():
                feat = feat.to(torch.float32)
            self.features[name] = feat.reshape(feat.shape[0], -1) if feat.dim() != 2 else feat

        return hook

    def attach(self) -> None:
        """Register one forward hook per module (idempotent)."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove every hook this recorder registered and drop stored activations."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Forget the activations of the previous forward pass."""
        self.features.clear()
        self._calls.clear()

    def collect(self) -> list[torch.Tensor]:
        """Return the activations of the last forward pass, one (b, d_i) tensor per module.

        Raises:
            RuntimeError: if a hooked module did not run, or returned no tensor, in that pass.
        """
        missing = [name for name in self.modules if name not in self.features]
        if missing:
            silent = [name for name in missing if name not in self._calls]
            detail = (
                f"never ran: {silent}" if silent else f"returned no tensor: {missing}"
            )
            raise RuntimeError(
                f"ActivationRecorder.collect: hooked layers of {self.owner} {detail}; "
                "choose layers that the forward pass calls and that output a tensor"
            )
        repeated = [name for name, count in self._calls.items() if count > 1]
        if repeated and not self._warned_repeat:
            self._warned_repeat = True
            warnings.warn(
                f"layers of {self.owner} ran more than once in one forward pass, the last output "
                f"is used: {repeated}",
                RuntimeWarning,
                stacklevel=3,
            )
        return [self.features[name] for name in self.modules]
