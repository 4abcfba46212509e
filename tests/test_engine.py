"""The CKA engine against the float64 reference, its invariances, accumulators and bad input.

Every numerical check compares the compiled engine with ``critlayers.reference`` (explicit
Grams, textbook centring, float64), over the devices and dtypes of ``critlayers.testing``.
"""

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import critlayers as cl
from critlayers import _ext
from critlayers import reference as ref
from critlayers.testing import DEVICES, FLOAT_DTYPES, as_strided_copy, cka_tolerance, make_layers

ESTIMATORS = [False, True]


def reference_inputs(feats):
    """What the engine sees after dtype rounding, as float64 CPU tensors for the reference."""
    return [f.detach().to("cpu", torch.float64) for f in feats]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("unbiased", ESTIMATORS)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("shape", [(3, 40, [24, 16, 40]), (4, 150, 32), (2, 97, 300)])
def test_cka_matrix_matches_reference(device, dtype, unbiased, kernel, shape):
    n_layers, n, d = shape
    feats = make_layers(n_layers, n, d, dtype=dtype, device=device, seed=n)
    expected = ref.cka_matrix(reference_inputs(feats), kernel=kernel, unbiased=unbiased)
    got = cl.cka_matrix(feats, kernel=kernel, unbiased=unbiased, tile=64)
    assert got.dtype == torch.float64 and got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, atol=cka_tolerance(dtype), rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_feature_form_matches_reference(device, dtype, unbiased):
    feats = make_layers(3, 260, [12, 20, 8], dtype=dtype, device=device)
    expected = ref.cka_matrix(reference_inputs(feats), unbiased=unbiased)
    got = cl.cka_matrix(feats, unbiased=unbiased, method="feature")
    torch.testing.assert_close(got.cpu(), expected, atol=cka_tolerance(dtype), rtol=0)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_gram_form_equals_feature_form(unbiased):
    feats = make_layers(4, 180, [30, 50, 20, 64], seed=3)
    gram = cl.cka_matrix(feats, unbiased=unbiased, method="gram")
    feature = cl.cka_matrix(feats, unbiased=unbiased, method="feature")
    torch.testing.assert_close(gram, feature, atol=1e-6, rtol=0)
    x, y = feats[0], feats[3]
    assert float(cl.linear_cka(x, y, unbiased)) == pytest.approx(
        float(cl.feature_space_linear_cka(x, y, unbiased)), abs=1e-6)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_cross_matrix_matches_reference(unbiased):
    xs = make_layers(3, 120, 24, seed=1)
    ys = make_layers(2, 120, [16, 40], seed=2)
    expected = ref.cka_matrix(xs, ys, unbiased=unbiased)
    for method in ("gram", "feature"):
        got = cl.cka_matrix(xs, ys, unbiased=unbiased, method=method)
        assert got.shape == (3, 2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_stacked_tensor_input_equals_list_input():
    feats = make_layers(3, 64, 16)
    torch.testing.assert_close(cl.cka_matrix(torch.stack(feats)), cl.cka_matrix(feats))


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_gram_functions_match_reference(unbiased):
    x, y = make_layers(2, 50, [20, 30], dtype=torch.float64)
    k, l = ref.gram_linear(x), ref.gram_rbf(y)
    torch.testing.assert_close(cl.gram_linear(x), k)
    torch.testing.assert_close(cl.gram_rbf(y), l)
    torch.testing.assert_close(cl.gram_rbf(y, sigma=2.5), ref.gram_rbf(y, sigma=2.5))
    torch.testing.assert_close(cl.center_gram(k, unbiased), ref.center_gram(k, unbiased))
    assert float(cl.hsic(k, l, unbiased)) == pytest.approx(ref.hsic(k, l, unbiased), rel=1e-10)
    assert float(cl.cka(k, l, unbiased)) == pytest.approx(ref.cka(k, l, unbiased), abs=1e-12)
    h = cl.gram_hsic_matrix(torch.stack([k, l]), unbiased=unbiased)
    assert float(h.xy[0, 1]) == pytest.approx(ref.hsic(k, l, unbiased), rel=1e-10)
    assert float(h.xx[1]) == pytest.approx(ref.hsic(l, l, unbiased), rel=1e-10)


def test_unbiased_hsic_equals_song_formula():
    x, y = make_layers(2, 40, [10, 12], dtype=torch.float64, seed=5)
    k, l = ref.gram_linear(x), ref.gram_linear(y)
    assert float(cl.hsic(k, l, unbiased=True)) == pytest.approx(ref.hsic_song(k, l), rel=1e-9)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_hsic_matrix_normalisation(unbiased):
    feats = make_layers(2, 60, 12, dtype=torch.float64)
    h = cl.hsic_matrix(feats, unbiased=unbiased)
    k0, k1 = (ref.gram_linear(f) for f in feats)
    assert float(h.xy[0, 1]) == pytest.approx(ref.hsic(k0, k1, unbiased), rel=1e-9)
    assert float(h.xx[0]) == pytest.approx(ref.hsic(k0, k0, unbiased), rel=1e-9)


# Invariances of linear CKA (Kornblith et al. 2019, section 3).


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_invariances(unbiased):
    x, y = make_layers(2, 200, 48, seed=7)
    base = float(cl.linear_cka(x, y, unbiased))
    q = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(1)))[0]
    assert float(cl.linear_cka(x @ q, y, unbiased)) == pytest.approx(base, abs=1e-5)
    assert float(cl.linear_cka(3.7 * x, y, unbiased)) == pytest.approx(base, abs=1e-5)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(2))
    assert float(cl.linear_cka(x[:, perm], y, unbiased)) == pytest.approx(base, abs=1e-5)
    assert float(cl.linear_cka(x, x, unbiased)) == pytest.approx(1.0, abs=1e-6)
    assert float(cl.linear_cka(y, x, unbiased)) == pytest.approx(base, abs=1e-6)
    general = torch.randn(48, 48, generator=torch.Generator().manual_seed(3)) * torch.logspace(
        -2, 1, 48)
    assert abs(float(cl.linear_cka(x @ general, y, unbiased)) - base) > 1e-3


def test_matrix_is_symmetric_with_unit_diagonal():
    m = cl.cka_matrix(make_layers(5, 128, 32))
    torch.testing.assert_close(m, m.T, atol=0, rtol=0)
    torch.testing.assert_close(m.diagonal(), torch.ones(5, dtype=torch.float64))
    assert bool(((m >= 0) & (m <= 1 + 1e-12)).all())


def test_debiased_cka_of_independent_data_is_near_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 512, generator=g), torch.randn(32, 512, generator=g)
    assert float(cl.linear_cka(x, y)) > 0.85  # the biased estimator's small-n inflation
    assert abs(float(cl.linear_cka(x, y, unbiased=True))) < 0.1


def test_negative_unbiased_hsic_is_reported_not_clamped():
    g = torch.Generator().manual_seed(4)
    values = [float(cl.linear_cka(torch.randn(16, 64, generator=g),
                                  torch.randn(16, 64, generator=g), unbiased=True))
              for _ in range(20)]
    assert min(values) < 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_large_scale_and_offset_inputs_stay_accurate(device, unbiased):
    feats = make_layers(3, 300, 64, offset=50.0, device=device)
    expected = ref.cka_matrix(reference_inputs(feats), unbiased=unbiased)
    big = [f * 1e4 for f in feats]
    got = cl.cka_matrix(big, unbiased=unbiased)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
@pytest.mark.parametrize("scale", [1e19, 1e-23])
def test_extreme_float32_scales_are_rescaled(unbiased, scale):
    # Unscaled, these layers' Gram entries would overflow float32 (1e19) or underflow to
    # zero (1e-23); the engine rescales such layers before forming their products.
    feats = make_layers(3, 200, 48, dtype=torch.float64)
    expected = ref.cka_matrix(feats, unbiased=unbiased)
    scaled = [(f * scale).float() for f in feats]
    got = cl.cka_matrix(scaled, unbiased=unbiased, method="gram")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [4, 100, 383, 384, 700, 1000, 3000, 4096, 50_000])
def test_default_tile_is_about_512_rows_in_multiples_of_64(n):
    from critlayers.functional import default_tile

    tile = default_tile(n)
    assert 1 <= tile <= min(n, 640)
    if 128 <= tile < n:
        assert tile % 64 == 0
    if n >= 384:
        assert tile < n


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_whole_layer_and_tile_schedules_agree_with_reference(unbiased):
    # 2 layers at n = 3000 exceed the whole-layer schedule's 64 MiB store, so the tile-outer
    # schedule runs; 2 layers at n = 300 take the whole-layer schedule, in bands of 40 rows.
    for n, tile in [(3000, 700), (300, 40)]:
        feats = make_layers(2, n, 12, seed=n)
        expected = ref.cka_matrix(reference_inputs(feats), unbiased=unbiased)
        got = cl.cka_matrix(feats, unbiased=unbiased, tile=tile, method="gram")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.fixture
def product_backend():
    """Restores the default rule for the CPU Gram products after a test changes it."""
    yield
    cl.set_cpu_product_backend("auto")


def test_cpu_gram_product_backend_follows_its_rule(product_backend):
    # The oneDNN linear op is looked up by name and argument types at run time; a torch whose
    # op changed must fall back to torch's BLAS rather than fail.
    has_onednn = _ext.load().cpu_has_onednn()
    assert has_onednn == torch.backends.mkldnn.is_available()
    # Long rows go to oneDNN wherever torch has it (the rule's other inputs only add oneDNN).
    assert cl.cpu_product_backend(4096) == ("onednn" if has_onednn else "blas")
    cl.set_cpu_product_backend("blas")
    assert cl.cpu_product_backend(4096) == "blas"
    if has_onednn:
        cl.set_cpu_product_backend("onednn")
        assert cl.cpu_product_backend(64) == "onednn"
    with pytest.raises(ValueError, match="'mkl'"):
        cl.set_cpu_product_backend("mkl")


@pytest.mark.parametrize("value, expected", [("blas", "blas"), ("bogus", "ValueError")])
def test_cpu_gram_product_backend_from_the_environment(value, expected):
    code = ("import critlayers as cl\n"
            "try:\n"
            "    print(cl.cpu_product_backend(4096))\n"
            "except ValueError as err:\n"
            "    print('ValueError', err)\n")
    env = {**os.environ, "CRITLAYERS_CPU_GEMM": value}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith(expected)
    if expected == "ValueError":
        assert "CRITLAYERS_CPU_GEMM" in out and "'bogus'" in out


@pytest.mark.parametrize("unbiased", [False, True])
def test_both_cpu_product_backends_agree_with_reference(product_backend, unbiased):
    feats = make_layers(3, 200, 48, seed=11)
    expected = ref.cka_matrix(reference_inputs(feats), unbiased=unbiased)
    for name in ["blas", "onednn"] if _ext.load().cpu_has_onednn() else ["blas"]:
        cl.set_cpu_product_backend(name)
        got = cl.cka_matrix(feats, unbiased=unbiased, method="gram")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.fixture
def generic_cpu_kernels():
    """The CPU ops without their CPU-only fast paths, composed as the CUDA half runs them."""
    engine = _ext.load()
    engine._use_generic_cpu_kernels(True)
    yield
    engine._use_generic_cpu_kernels(False)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_generic_compositions_match_reference(generic_cpu_kernels, unbiased):
    cases = [(make_layers(3, 150, [24, 16, 40]), 40), (make_layers(2, 3000, 12, seed=3), 700),
             ([(f * 1e19).float() for f in make_layers(2, 120, 20, dtype=torch.float64)], 50)]
    for feats, tile in cases:
        expected = ref.cka_matrix(reference_inputs(feats), unbiased=unbiased)
        got = cl.cka_matrix(feats, unbiased=unbiased, tile=tile, method="gram")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_finite_and_accurate(dtype):
    feats = make_layers(3, 256, 128, offset=20.0, dtype=dtype)
    got = cl.cka_matrix(feats, unbiased=True)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref.cka_matrix(reference_inputs(feats), unbiased=True),
                               atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 70), widths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       unbiased=st.booleans(), tile=st.integers(1, 80), seed=st.integers(0, 10_000))
def test_random_shapes_and_strides_match_reference(n, widths, layout, unbiased, tile, seed):
    feats = make_layers(len(widths), n, widths, seed=seed, dtype=torch.float64)
    views = [as_strided_copy(f, layout) for f in feats]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = ref.cka_matrix(feats, unbiased=unbiased)
        got = cl.cka_matrix(views, unbiased=unbiased, tile=tile, method="gram")
        feature = cl.cka_matrix(views, unbiased=unbiased, method="feature")
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0, equal_nan=True)
    torch.testing.assert_close(feature, expected, atol=1e-8, rtol=0, equal_nan=True)


def test_numpy_and_integer_inputs():
    x, y = make_layers(2, 50, 10, dtype=torch.float64)
    got = cl.linear_cka(x.numpy(), y.numpy())
    assert float(got) == pytest.approx(ref.linear_cka(x, y), abs=1e-12)
    ints = torch.randint(0, 5, (30, 6))
    assert math.isfinite(float(cl.linear_cka(ints, ints + 1)))


def test_ops_trace_under_torch_compile():
    feats = make_layers(3, 64, 16)
    eager = torch.ops.critlayers.gram_hsic(feats, "linear", [], True, 32)
    compiled = torch.compile(lambda f: torch.ops.critlayers.gram_hsic(f, "linear", [], True, 32))
    torch.testing.assert_close(compiled(feats), eager)


@pytest.mark.parametrize("op, args", [
    ("gram_hsic", lambda f: (f, "linear", [], False, 32)),
    ("gram_hsic", lambda f: (f, "rbf", [0.01, 0.02], True, 16)),
    ("center_gram", lambda f: (f[0] @ f[0].T, True)),
    ("gram_pair_hsic", lambda f: (torch.stack([g @ g.T for g in f]),
                                  torch.stack([g @ g.T for g in f]), False, 8)),
])
def test_opcheck(op, args):
    feats = make_layers(2, 40, 12)
    torch.library.opcheck(getattr(torch.ops.critlayers, op).default, args(feats))


# Accumulators.


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_single_minibatch_equals_full_batch(unbiased):
    feats = make_layers(4, 90, 24)
    acc = cl.MinibatchCKA(4, unbiased=unbiased)
    acc.update(feats)
    torch.testing.assert_close(acc.compute(), ref.cka_matrix(feats, unbiased=unbiased),
                               atol=1e-5, rtol=0)


def test_minibatch_sums_per_batch_hsic():
    feats = make_layers(3, 120, 16, seed=9)
    acc = cl.MinibatchCKA(3)
    sizes = [40, 50, 30]
    start, expected_xy = 0, torch.zeros(3, 3, dtype=torch.float64)
    for size in sizes:
        batch = [f[start:start + size] for f in feats]
        acc.update(batch)
        grams = [ref.gram_linear(b) for b in batch]
        expected_xy += torch.tensor([[ref.hsic(a, b, True) for b in grams] for a in grams])
        start += size
    torch.testing.assert_close(acc.hsic_xy, expected_xy, rtol=1e-5, atol=0)
    xx = expected_xy.diagonal()
    torch.testing.assert_close(acc.compute(), expected_xy / torch.outer(xx, xx).sqrt(),
                               atol=1e-6, rtol=0)
    assert (acc.n_batches, acc.n_examples) == (3, 120)


def test_minibatch_merge_and_state_dict_resume():
    feats = make_layers(3, 160, 20, seed=11)
    batches = [[f[i:i + 40] for f in feats] for i in range(0, 160, 40)]
    whole = cl.MinibatchCKA(3)
    for b in batches:
        whole.update(b)
    left, right = cl.MinibatchCKA(3), cl.MinibatchCKA(3)
    for b in batches[:2]:
        left.update(b)
    for b in batches[2:]:
        right.update(b)
    left.merge(right)
    torch.testing.assert_close(left.compute(), whole.compute(), atol=1e-12, rtol=0)
    resumed = cl.MinibatchCKA(3)
    resumed.load_state_dict(left.state_dict())
    torch.testing.assert_close(resumed.compute(), whole.compute(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="n_layers"):
        cl.MinibatchCKA(4).load_state_dict(left.state_dict())


def test_minibatch_cross_model():
    xs, ys = make_layers(2, 100, 16, seed=1), make_layers(3, 100, 8, seed=2)
    acc = cl.MinibatchCKA(2, 3, unbiased=True)
    acc.update(xs, ys)
    torch.testing.assert_close(acc.compute(), ref.cka_matrix(xs, ys, unbiased=True),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("unbiased", ESTIMATORS)
def test_streaming_equals_full_data(unbiased):
    feats = make_layers(4, 333, [12, 30, 8, 16], offset=40.0, seed=12)
    stream = cl.StreamingLinearCKA(4, unbiased=unbiased)
    for start in range(0, 333, 50):
        stream.update([f[start:start + 50] for f in feats])
    expected = ref.cka_matrix(feats, unbiased=unbiased)
    torch.testing.assert_close(stream.compute(), expected, atol=1e-6, rtol=0)
    h = stream.hsic()
    k0, k1 = ref.gram_linear(feats[0]), ref.gram_linear(feats[1])
    assert float(h.xy[0, 1]) == pytest.approx(ref.hsic(k0, k1, unbiased), rel=1e-5)


def test_streaming_merge_state_dict_and_cross():
    xs, ys = make_layers(2, 200, 10, seed=3), make_layers(2, 200, 6, seed=4)
    shifts = [torch.zeros(10, dtype=torch.float64)] * 2 + [torch.zeros(6, dtype=torch.float64)] * 2
    a = cl.StreamingLinearCKA(2, 2, shifts=shifts)
    b = cl.StreamingLinearCKA(2, 2, shifts=shifts)
    a.update([x[:120] for x in xs], [y[:120] for y in ys])
    b.update([x[120:] for x in xs], [y[120:] for y in ys])
    a.merge(b)
    torch.testing.assert_close(a.compute(), ref.cka_matrix(xs, ys), atol=1e-6, rtol=0)
    resumed = cl.StreamingLinearCKA(2, 2)
    resumed.load_state_dict(a.state_dict())
    torch.testing.assert_close(resumed.compute(), a.compute(), atol=0, rtol=0)
    # Without shared shifts each accumulator centres on its own first batch: merging must refuse.
    c, d = cl.StreamingLinearCKA(2, 2), cl.StreamingLinearCKA(2, 2)
    c.update([x[:50] for x in xs], [y[:50] for y in ys])
    d.update([x[60:] for x in xs], [y[60:] for y in ys])
    with pytest.raises(ValueError, match="same shifts"):
        c.merge(d)


# Bad input: ValueError naming the function, the argument and the value.


def test_mismatched_examples_name_the_layer():
    message = r"cka_matrix: feats\[1\] has 9 rows but feats\[0\] has 10"
    with pytest.raises(ValueError, match=message):
        cl.cka_matrix([torch.randn(10, 3), torch.randn(9, 3)])
    with pytest.raises(ValueError, match="feats_y has n = 7"):
        cl.cka_matrix([torch.randn(10, 3)], [torch.randn(7, 3)])


def test_too_few_examples():
    with pytest.raises(ValueError, match="unbiased estimator needs n > 3 examples, got n = 3"):
        cl.cka_matrix([torch.randn(3, 4)] * 2, unbiased=True)
    with pytest.raises(ValueError, match="got n = 1"):
        cl.linear_cka(torch.randn(1, 4), torch.randn(1, 4))
    acc = cl.MinibatchCKA(1)
    with pytest.raises(ValueError, match="MinibatchCKA.update.*n = 2"):
        acc.update([torch.randn(2, 4)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_layer(bad):
    x = torch.randn(10, 4)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"cka_matrix: feats\[1\] contains NaN or Inf"):
        cl.cka_matrix([torch.randn(10, 4), x])
    stream = cl.StreamingLinearCKA(1)
    with pytest.raises(ValueError, match=r"feats\[0\] contains NaN or Inf"):
        stream.update([x])


def test_empty_and_wrong_rank():
    with pytest.raises(ValueError, match="feats is empty"):
        cl.cka_matrix([])
    with pytest.raises(ValueError, match=r"feats\[0\] must be 2-D, got shape \(10,\)"):
        cl.cka_matrix([torch.randn(10)])
    with pytest.raises(ValueError, match=r"feats\[0\] is empty"):
        cl.cka_matrix([torch.randn(0, 4)])
    with pytest.raises(ValueError, match="must be .n_layers, n, d."):
        cl.cka_matrix(torch.randn(4, 5))


def test_bad_options():
    feats = [torch.randn(10, 4)]
    with pytest.raises(ValueError, match="kernel must be one of .*got 'cosine'"):
        cl.cka_matrix(feats, kernel="cosine")
    with pytest.raises(ValueError, match="method='feature' needs kernel='linear'"):
        cl.cka_matrix(feats, kernel="rbf", method="feature")
    with pytest.raises(ValueError, match="threshold must be a positive finite number, got -1"):
        cl.rbf_cka(feats[0], feats[0], threshold=-1)
    with pytest.raises(ValueError, match="tile must be a positive integer, got 0"):
        cl.cka_matrix(feats, tile=0)
    with pytest.raises(ValueError, match="n_layers must be a positive integer, got 0"):
        cl.MinibatchCKA(0)
    with pytest.raises(ValueError, match="gram must be symmetric"):
        cl.center_gram(torch.randn(6, 6))


def test_constant_layer_gives_nan_and_one_warning():
    feats = make_layers(3, 50, 8)
    feats[1] = torch.full((50, 8), 2.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = cl.cka_matrix(feats)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "layers [1]" in messages[0]
    assert bool(torch.isnan(m[1]).all()) and bool(torch.isnan(m[:, 1]).all())
    finite = m[[0, 2]][:, [0, 2]]
    assert bool(torch.isfinite(finite).all())


def test_engine_error_when_called_directly_names_the_op():
    with pytest.raises(ValueError, match=r"critlayers::gram_hsic: feats\[1\] has 3 rows"):
        torch.ops.critlayers.gram_hsic([torch.randn(4, 2), torch.randn(3, 2)], "linear", [],
                                       False, 8)


def test_reference_agrees_with_numpy_formulas():
    """The reference itself, against a direct NumPy transcription of Kornblith et al."""
    x, y = (np.asarray(f) for f in make_layers(2, 30, 7, dtype=torch.float64))
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    expected = np.sum((h @ k @ h) * (h @ l @ h)) / np.sqrt(
        np.sum((h @ k @ h) ** 2) * np.sum((h @ l @ h) ** 2))
    assert ref.linear_cka(x, y) == pytest.approx(expected, rel=1e-12)


def test_missing_extension_error_carries_the_rebuild_command(monkeypatch):
    import importlib

    from critlayers import _ext

    def fail(name):
        raise ImportError(f"No module named '{name}'")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _ext.load()
