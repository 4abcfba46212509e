"""critlayers.compat.pytorch_cka against the real pytorch-cka package (imported as ``cka``)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from critlayers import reference as ref
from critlayers.compat import pytorch_cka as shim

peer = pytest.importorskip("cka", reason="the pytorch-cka package is not installed")
if not hasattr(peer, "compute_cka"):
    pytest.skip("an unrelated module named `cka` shadows pytorch-cka", allow_module_level=True)


def _mlp(seed, width=12, depth=3):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers).double()


def _loader(n=64, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) + 0.3
    return DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=batch_size)


def _grams(seed, n_layers, n=20):
    base = torch.randn(n, 5, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    feats = [torch.cat([base * (i + 1), torch.randn(n, 7, generator=g, dtype=torch.float64)], 1)
             for i in range(n_layers)]
    return torch.stack([f @ f.T for f in feats]), feats


def test_hsic_and_hsic_cross_match_peer():
    gx, _ = _grams(0, 3)
    gy, _ = _grams(1, 2)
    ours = shim.hsic(gx, gy)
    theirs = peer.hsic(gx, gy)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-8, atol=0)
    torch.testing.assert_close(shim.hsic_cross(gx, gy), peer.hsic_cross(gx, gy), rtol=1e-8,
                               atol=0)


def test_cka_from_features_matches_peer_where_it_does_not_clamp():
    _, fx = _grams(2, 3)
    _, fy = _grams(3, 2)
    ours = shim.cka_from_features(fx, fy)
    theirs = peer.cka_from_features(fx, fy)
    assert ours.shape == (3, 2)
    inside = (ours > 0) & (ours < 1)
    assert inside.any()
    torch.testing.assert_close(ours[inside], theirs[inside], rtol=0, atol=1e-5)
    stacked = torch.stack(fx)
    torch.testing.assert_close(shim.cka_from_features(stacked, fx[0]),
                               peer.cka_from_features(stacked, fx[0]), rtol=0, atol=1e-5)


def test_cka_from_features_reports_what_the_peer_clamps():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 300, generator=g, dtype=torch.float64)
    ys = [torch.randn(12, 300, generator=g, dtype=torch.float64) for _ in range(8)]
    ours = shim.cka_from_features([x], ys)
    theirs = peer.cka_from_features([x], ys)
    assert (ours < 0).any(), "independent wide features should give some negative estimates"
    torch.testing.assert_close(theirs, ours.clamp(0, 1), rtol=0, atol=1e-5)
    expected = torch.tensor([[ref.linear_cka(x, y, unbiased=True) for y in ys]],
                            dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
    const = torch.ones(12, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        out = shim.cka_from_features([x], [const])
    assert torch.isnan(out).all() and abs(float(peer.cka_from_features([x], [const]))) < 1e-6


def test_compute_cka_matches_peer_across_models():
    m1, m2 = _mlp(0), _mlp(1, depth=2)
    loaders = [_loader(seed=0), _loader(n=48, seed=1)]
    layers1, layers2 = ["0", "2", "4", "5"], ["1", "3"]
    ours = shim.compute_cka(m1, m2, *loaders, layers=layers1, model2_layers=layers2,
                            device="cpu", progress=False)
    theirs = peer.compute_cka(m1, m2, *loaders, layers=layers1, model2_layers=layers2,
                              device="cpu", progress=False)
    assert len(ours) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == (4, 2) and a.dtype == torch.float64
        assert ((a > 0) & (a < 1)).all()
        torch.testing.assert_close(a, b.double(), rtol=0, atol=1e-5)


def test_compute_cka_same_model_int_layers_and_list_of_loaders():
    model = _mlp(2)
    loader = _loader(seed=3)
    (ours,) = shim.compute_cka(model, model, [loader], layers=[0, 2, -1], device="cpu",
                               progress=False)
    (theirs,) = peer.compute_cka(model, model, [loader], layers=[0, 2, -1], device="cpu",
                                 progress=False)
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(ours), torch.ones(3, dtype=torch.float64))


def test_context_manager_restores_model_and_checks_hooks():
    model = _mlp(3)
    model.train()

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()

        def forward(self, x):
            return self.used(x)

    with shim.CKA(model, Skips(), layers=["0"], model2_layers=["used", "unused"],
                  device="cpu") as session:
        assert not model.training
        with pytest.raises(RuntimeError, match="unused"):
            session.compare(_loader(), progress=False)
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"):
        shim.CKA(model, model, layers=["0"], device="cpu").compare(_loader())


def test_errors_match_peer_kinds():
    model = _mlp(4)
    with pytest.raises(ValueError, match="not found"):
        shim.CKA(model, model, layers=["nope"], device="cpu")
    with pytest.raises(IndexError):
        shim.CKA(model, model, layers=[99], device="cpu")
    with pytest.raises(TypeError):
        shim.CKA(model, model, layers=[1.5], device="cpu")
    with pytest.raises(ValueError, match="more than 3 examples"):
        shim.compute_cka(model, model, _loader(n=3, batch_size=3), layers=["0"], device="cpu",
                         progress=False)
    with pytest.raises(ValueError, match="hsic: the unbiased HSIC needs n > 3"):
        shim.hsic(torch.eye(3)[None], torch.eye(3)[None])
    with pytest.raises(ValueError, match="at least one dataloader"):
        shim.compute_cka(model, model)


def test_inputs_are_left_unchanged():
    _, fx = _grams(5, 3)
    before = [f.clone() for f in fx]
    shim.cka_from_features(fx, fx)
    for f, f0 in zip(fx, before, strict=True):
        torch.testing.assert_close(f, f0, rtol=0, atol=0)
