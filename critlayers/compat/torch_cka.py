"""Drop-in replacement for the ``torch_cka`` package (PyTorch-Model-Compare).

The package compares two networks layer by layer: a ``CKA`` object hooks the chosen modules,
``compare`` runs both models over data loaders and accumulates the unbiased HSIC per batch (the
minibatch CKA of Nguyen et al., arXiv:2010.15327), ``export`` returns the matrix with layer and data
set names, and ``plot_results`` draws it. Changing the import moves the computation onto the
critlayers engine::

    from torch_cka import CKA                        # before
    from critlayers.compat.torch_cka import CKA      # after

Estimator, for layer ``i`` of model 1 and ``j`` of model 2 over batches ``b``::

    CKA_ij = sum_b HSIC_u(K_ib, L_jb) / sqrt(sum_b HSIC_u(K_ib, K_ib) * sum_b HSIC_u(L_jb, L_jb))

with ``HSIC_u`` the unbiased estimator of Song et al. (2012, arXiv:0704.2668) on the linear Grams of
the flattened activations. The package divided every term by the number of batches, which cancels.

Note:
    Where the package fails, this module keeps its intent and differs as follows.

    * Sums are accumulated in float64 under ``torch.no_grad``. The package accumulated in float32
      with autograd on, so activations and their graphs stayed alive (gigabytes on large models),
      and since HSIC grows as the fourth power of the activation scale, long runs over large
      activations overflowed to NaN and tripped its NaN assertion.
    * A batch of ``n <= 3`` examples (a short last batch) has no unbiased HSIC; it is skipped with
      one ``RuntimeWarning`` instead of turning the whole matrix into NaN.
    * A requested layer name that the model does not have raises ``ValueError`` at construction
      (the package left a row of zeros that became NaN); a hooked layer that does not run raises
      ``RuntimeError`` naming it. A layer that returns a tuple contributes its first element.
    * Rows and columns follow ``named_modules()`` order, the order of the exported layer names;
      the package ordered rows by hook firing order, so labels and rows could disagree.
    * Hooks are registered only while ``compare`` runs, then removed.
    * A batch given as a bare tensor is used as the input (the package unpacked it along the
      first axis and fed only its first example).
    * ``hsic_matrix`` is float64 and may hold NaN for a constant layer (with one warning) where
      the package raised ``AssertionError``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import critlayers as cl
from critlayers.compat._common import ActivationRecorder

__all__ = ["CKA"]


def _model_name(model: nn.Module, given: str | None) -> str:
    return given if given is not None else repr(model).split("(")[0]


def _dataset_name(loader) -> str:
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return type(loader).__name__
    return repr(dataset).split("\n")[0]


def _select_layers(model: nn.Module, layers, owner: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if layers is None:
        return modules
    if isinstance(layers, str):
        layers = [layers]
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(
            f"CKA: {owner}_layers names modules that {owner} does not have: {unknown}; see "
            f"{owner}.named_modules()"
        )
    wanted = set(layers)
    return {name: module for name, module in modules.items() if name in wanted}


def _first_item(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


class CKA:
    """Compare two models layer by layer with minibatch CKA.

    Args:
        model1: first network.
        model2: second network (may be the same object).
        model1_name: label for model 1; defaults to its class name.
        model2_name: label for model 2; defaults to its class name.
        model1_layers: names of the modules of model 1 to compare; ``None`` takes every module,
            the model itself included.
        model2_layers: the same for model 2.
        device: where the models run; they are moved there and put in eval mode.

    Attributes:
        hsic_matrix: after :meth:`compare`, the float64 CKA matrix of shape
            (len(model1 layers), len(model2 layers)).
        model1_info, model2_info: dicts with ``Name``, ``Layers`` and, after :meth:`compare`,
            ``Dataset``.

    Raises:
        ValueError: if a requested layer name is not a module of its model.
    """

    def __init__(
        self,
        model1: nn.Module,
        model2: nn.Module,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: list[str] | None = None,
        model2_layers: list[str] | None = None,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self.model1_info = {"Name": _model_name(model1, model1_name)}
        self.model2_info = {"Name": _model_name(model2, model2_name)}
        if self.model1_info["Name"] == self.model2_info["Name"]:
            warnings.warn(
                f"both models are named {self.model1_info['Name']!r}; pass model1_name and "
                "model2_name to tell them apart in the results",
                stacklevel=2,
            )
        for owner, model, layers in (("model1", model1, model1_layers),
                                     ("model2", model2, model2_layers)):
            if layers is None and len(list(model.modules())) > 150:
                warnings.warn(
                    f"{owner} has more than 150 modules; pass {owner}_layers to compare fewer",
                    stacklevel=2,
                )
        self._modules1 = _select_layers(model1, model1_layers, "model1")
        self._modules2 = _select_layers(model2, model2_layers, "model2")
        self.model1_layers = model1_layers
        self.model2_layers = model2_layers
        self.model1_info["Layers"] = list(self._modules1)
        self.model2_info["Layers"] = list(self._modules2)
        self.model1 = model1.to(device)
        self.model2 = model2.to(device)
        self.model1.eval()
        self.model2.eval()

    def compare(self, dataloader1, dataloader2=None) -> None:
        """Accumulate minibatch CKA of every layer pair and store it in ``hsic_matrix``.

        Args:
            dataloader1: batches for model 1; a batch is a tensor or a tuple/list whose first item
                is the input.
            dataloader2: batches for model 2, the same examples in the same order; defaults to
                ``dataloader1``. Iteration stops at the shorter loader.

        Raises:
            RuntimeError: if a hooked layer did not run in a forward pass.
            ValueError: if the two loaders yield batches of different sizes, or if no batch had
                more than 3 examples.
        """
        if dataloader2 is None:
            warnings.warn("dataloader2 not given; model 2 sees the batches of dataloader1",
                          stacklevel=2)
            dataloader2 = dataloader1
        self.model1_info["Dataset"] = _dataset_name(dataloader1)
        self.model2_info["Dataset"] = _dataset_name(dataloader2)

        same_pass = self.model1 is self.model2 and dataloader2 is dataloader1
        within = same_pass and list(self._modules1) == list(self._modules2)
        n1, n2 = len(self._modules1), len(self._modules2)
        state = cl.MinibatchCKA(n1, unbiased=True) if within else cl.MinibatchCKA(
            n1, n2, unbiased=True)
        recorder1 = ActivationRecorder(self._modules1, "model1")
        recorder2 = ActivationRecorder(self._modules2, "model2")
        batches = iter(dataloader1) if same_pass else zip(dataloader1, dataloader2, strict=False)
        used = skipped = 0
        recorder1.attach()
        recorder2.attach()
        try:
            with torch.no_grad():
                for item in batches:
                    x1, x2 = (item, item) if same_pass else item
                    x1, x2 = _first_item(x1), _first_item(x2)
                    if x1.shape[0] != x2.shape[0]:
                        raise ValueError(
                            "CKA.compare: dataloader1 and dataloader2 must yield the same "
                            f"examples, got batch sizes {x1.shape[0]} and {x2.shape[0]}"
                        )
                    if x1.shape[0] <= 3:
                        skipped += 1
                        continue
                    recorder1.clear()
                    recorder2.clear()
                    self.model1(x1.to(self.device))
                    feats1 = recorder1.collect()
                    if same_pass:
                        feats2 = recorder2.collect()
                    else:
                        recorder1.clear()
                        recorder2.clear()
                        self.model2(x2.to(self.device))
                        feats2 = recorder2.collect()
                    if within:
                        state.update(feats1)
                    else:
                        state.update(feats1, feats2)
                    used += 1
        finally:
            recorder1.detach()
            recorder2.detach()
        if skipped:
            warnings.warn(
                f"CKA.compare: skipped {skipped} batch(es) of 3 examples or fewer, which have no "
                "unbiased HSIC estimate",
                RuntimeWarning,
                stacklevel=2,
            )
        if used == 0:
            raise ValueError("CKA.compare: no batch had more than 3 examples")
        self.hsic_matrix = state.compute()

    def export(self) -> dict:
        """The result of :meth:`compare` with its labels.

        Returns:
            dict with keys ``model1_name``, ``model2_name``, ``CKA`` (the matrix),
            ``model1_layers``, ``model2_layers``, ``dataset1_name``, ``dataset2_name``.

        Raises:
            RuntimeError: if :meth:`compare` has not run.
        """
        if not hasattr(self, "hsic_matrix"):
            raise RuntimeError("CKA.export: call compare(dataloader1, dataloader2) first")
        return {
            "model1_name": self.model1_info["Name"],
            "model2_name": self.model2_info["Name"],
            "CKA": self.hsic_matrix,
            "model1_layers": self.model1_info["Layers"],
            "model2_layers": self.model2_info["Layers"],
            "dataset1_name": self.model1_info["Dataset"],
            "dataset2_name": self.model2_info["Dataset"],
        }

    def plot_results(self, save_path: str | None = None, title: str | None = None) -> None:
        """Draw the CKA matrix as a heat map (model 1 layers on y, model 2 on x) and show it.

        Args:
            save_path: also save the figure there (300 dpi) when given.
            title: figure title; defaults to ``"<model1> vs <model2>"``.

        Raises:
            RuntimeError: if :meth:`compare` has not run.
        """
        if not hasattr(self, "hsic_matrix"):
            raise RuntimeError("CKA.plot_results: call compare(dataloader1, dataloader2) first")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        image = ax.imshow(self.hsic_matrix.cpu().numpy(), origin="lower", cmap="magma")
        ax.set_xlabel(f"Layers {self.model2_info['Name']}", fontsize=15)
        ax.set_ylabel(f"Layers {self.model1_info['Name']}", fontsize=15)
        default = f"{self.model1_info['Name']} vs {self.model2_info['Name']}"
        ax.set_title(title if title is not None else default, fontsize=18)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        if save_path is not None:
            fig.savefig(save_path, dpi=300)
        plt.show()
