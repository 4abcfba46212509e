"""critlayers.compat.torch_cka against the real torch_cka package (PyTorch-Model-Compare).

The package builds float32 helper tensors, so it is run with float64 as the default dtype and
float64 models: that keeps its arithmetic at the precision the comparison needs.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from critlayers.compat import torch_cka as shim

peer = pytest.importorskip("torch_cka", reason="the torch_cka package is not installed")


def _mlp(seed, depth=3, width=10):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers).double()


def _loader(n=60, batch_size=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) + 0.2
    return DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=batch_size)


def _run_peer(m1, m2, loader1, loader2=None, **kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = peer.CKA(m1, m2, **kwargs)
            session.compare(loader1, loader2)
    finally:
        torch.set_default_dtype(previous)
    return session


def _run_shim(m1, m2, loader1, loader2=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = shim.CKA(m1, m2, **kwargs)
        session.compare(loader1, loader2)
    return session


def test_compare_and_export_match_peer():
    m1, m2 = _mlp(0), _mlp(1, depth=2)
    kwargs = dict(model1_name="A", model2_name="B", model1_layers=["0", "2", "3", "5"],
                  model2_layers=["1", "3"])
    loader1, loader2 = _loader(seed=0), _loader(seed=0)
    ours = _run_shim(_mlp(0), _mlp(1, depth=2), loader1, loader2, **kwargs)
    theirs = _run_peer(m1, m2, loader1, loader2, **kwargs)
    assert ours.hsic_matrix.shape == (4, 2) and ours.hsic_matrix.dtype == torch.float64
    torch.testing.assert_close(ours.hsic_matrix, theirs.hsic_matrix, rtol=0, atol=1e-5)
    ours_export, theirs_export = ours.export(), theirs.export()
    assert ours_export.keys() == theirs_export.keys()
    for key in ours_export:
        if key != "CKA":
            assert ours_export[key] == theirs_export[key], key


def test_same_model_same_loader_single_pass_matches_peer():
    model = _mlp(2)
    loader = _loader(seed=1)
    kwargs = dict(model1_name="M", model2_name="N", model1_layers=["1", "3", "5"],
                  model2_layers=["1", "3", "5"])
    ours = _run_shim(model, model, loader, **kwargs)
    theirs = _run_peer(model, model, loader, **kwargs)
    torch.testing.assert_close(ours.hsic_matrix, theirs.hsic_matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(ours.hsic_matrix), torch.ones(3).double())


def test_all_layers_rows_follow_the_labels():
    """With every module hooked, the peer's rows follow hook firing order (the root last) while
    its labels follow named_modules (the root first); here rows follow the labels."""
    m1, m2 = _mlp(3, depth=1), _mlp(4, depth=1)
    loader = _loader(seed=2)
    ours = _run_shim(m1, m2, loader, loader, model1_name="A", model2_name="B")
    theirs = _run_peer(m1, m2, loader, loader, model1_name="A", model2_name="B")
    assert ours.export()["model1_layers"] == ["", "0", "1"]
    order = [1, 2, 0]  # peer row k holds the k-th module to fire: "0", "1", then the root
    torch.testing.assert_close(ours.hsic_matrix[order][:, order], theirs.hsic_matrix,
                               rtol=0, atol=1e-5)


def test_short_last_batch_is_skipped_with_a_warning():
    model1, model2 = _mlp(5), _mlp(6)
    kwargs = dict(model1_name="A", model2_name="B", model1_layers=["1"], model2_layers=["3"])
    x = torch.randn(62, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ragged = DataLoader(TensorDataset(x, torch.zeros(62)), batch_size=15)
    full = DataLoader(TensorDataset(x[:60], torch.zeros(60)), batch_size=15)
    session = shim.CKA(model1, model2, **kwargs)
    with pytest.warns(RuntimeWarning, match="skipped 1 batch"):
        session.compare(ragged, ragged)
    expected = _run_peer(model1, model2, full, full, **kwargs)
    torch.testing.assert_close(session.hsic_matrix, expected.hsic_matrix, rtol=0, atol=1e-5)


def test_errors_hooks_removed_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model1, model2 = _mlp(7), _mlp(8)
    with pytest.raises(ValueError, match="model1_layers"):
        shim.CKA(model1, model2, model1_name="A", model2_name="B", model1_layers=["9"])
    with pytest.warns(UserWarning, match="named"):
        shim.CKA(model1, model2)
    session = shim.CKA(model1, model2, model1_name="A", model2_name="B", model1_layers=["1"],
                       model2_layers=["1", "3"])
    with pytest.raises(RuntimeError, match="compare"):
        session.export()
    with pytest.warns(UserWarning, match="dataloader2"):
        session.compare(_loader())
    assert not any(m._forward_hooks for m in list(model1.modules()) + list(model2.modules()))
    assert session.export()["dataset1_name"].startswith("<torch.utils.data.dataset.TensorDataset")
    out = tmp_path / "cka.png"
    session.plot_results(save_path=str(out), title="t")
    assert out.stat().st_size > 0
