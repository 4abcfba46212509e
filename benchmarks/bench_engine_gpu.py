"""Benchmark of the CKA engine's Gram path on a GPU, against plain Gram products in torch.

Run from the repository root, with critlayers built (CUDA half included for ``--device cuda``)::

    python benchmarks/bench_engine_gpu.py [--device cuda] [--quick] [--out PATH]

Workloads (random float32 features; each layer is the previous one plus noise, so that the CKA
map has structure):

* A: 18 layers, n = 512, d = 640
* B: 32 layers, n = 300, d = 4096
* C: 18 layers, n = 4096, d = 640
* D: one pair (2 layers), n = 8192, d = 1024

For each workload, in one run:

1. Correctness first: ``critlayers.cka_matrix(feats, method="gram")`` against the float64 CPU
   reference (``critlayers.reference.cka`` on float64 Grams) for every pair of layers. Where the
   reference would be slow (n_layers * n^2 large) it is computed for the pairs of a subsample
   of the layers and compared with the matching entries of the engine's full map (a pair's CKA
   does not depend on the other layers).
2. Warm-up, then the engine timed with ``torch.utils.benchmark`` (which synchronises the
   device around each measurement); the median is reported.
3. Peak device memory of one engine call (``torch.cuda.max_memory_allocated``), in total and
   above the memory the features already held.
4. Achieved TFLOP/s of the engine from the Gram products it performs: for every layer and
   every tile (i, j) of the upper triangle it visits, ``2 * t_i * t_j * d`` FLOPs.
5. The baseline in the same run: the n_layers Gram products ``x @ x.T`` alone in torch
   (``2 * n^2 * d`` FLOPs each, the full square); the table gives engine time / baseline time.

Matrix products run in full float32 (TF32 off, torch's default), as the engine's accuracy
assumes. An out-of-memory error is reported as an infinite time. ``--device cpu --quick``
runs shrunken workloads on the CPU to exercise the code path without a GPU.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

import critlayers
from critlayers import reference
from critlayers.functional import default_tile

# Largest n_layers * n^2 for which the reference runs on every layer; above it, on a subsample.
REFERENCE_BUDGET = 18 * 1024 * 1024
REFERENCE_LAYERS = 3


@dataclass(frozen=True)
class Workload:
    name: str
    n_layers: int
    n: int
    d: int


WORKLOADS = [
    Workload("A", 18, 512, 640),
    Workload("B", 32, 300, 4096),
    Workload("C", 18, 4096, 640),
    Workload("D", 2, 8192, 1024),
]

QUICK_WORKLOADS = [
    Workload("A", 6, 128, 64),
    Workload("B", 8, 96, 512),
    Workload("C", 6, 640, 64),
    Workload("D", 2, 1024, 128),
]


def make_features(w: Workload, device: torch.device, seed: int) -> list[torch.Tensor]:
    """A residual-stream-like stack: layer l + 1 is layer l plus fresh noise, float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(w.n, w.d, generator=gen, device=device)
    feats = [x]
    for _ in range(w.n_layers - 1):
        x = x + 0.5 * torch.randn(w.n, w.d, generator=gen, device=device)
        feats.append(x)
    return feats


def engine_flops(n_layers: int, n: int, d: int, tile: int) -> float:
    """FLOPs of the Gram products over the upper triangle of tiles that the engine visits."""
    edges = [min(tile, n - start) for start in range(0, n, tile)]
    pairs = sum(edges[i] * edges[j] for i in range(len(edges)) for j in range(i, len(edges)))
    return 2.0 * n_layers * pairs * d


def reference_layers(w: Workload) -> list[int]:
    """Indices of the layers the float64 reference is computed on."""
    if w.n_layers * w.n * w.n <= REFERENCE_BUDGET or w.n_layers <= REFERENCE_LAYERS:
        return list(range(w.n_layers))
    step = (w.n_layers - 1) / (REFERENCE_LAYERS - 1)
    return sorted({round(i * step) for i in range(REFERENCE_LAYERS)})


def reference_error(got: torch.Tensor, feats: list[torch.Tensor], layers: list[int]) -> float:
    """Largest |engine - reference| over the pairs a < b of ``layers`` (the diagonal is 1)."""
    grams = {i: reference.gram_linear(feats[i].cpu()) for i in layers}
    error = 0.0
    for pos, a in enumerate(layers):
        for b in layers[pos + 1:]:
            error = max(error, abs(float(got[a, b]) - reference.cka(grams[a], grams[b])))
    return error


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, min_run_time: float, warmup: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls; inf on out-of-memory."""
    try:
        for _ in range(warmup):
            fn()
        synchronize(device)
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
        return timer.blocked_autorange(min_run_time=min_run_time).median
    except torch.OutOfMemoryError:
        return math.inf


def peak_memory(fn, device: torch.device) -> tuple[float, float]:
    """Peak device memory (total, above what was allocated before) of one call, in GiB."""
    if device.type != "cuda":
        return math.nan, math.nan
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        fn()
    except torch.OutOfMemoryError:
        return math.inf, math.inf
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**30, (peak - before) / 2**30


def run_workload(w: Workload, device: torch.device, args) -> dict:
    feats = make_features(w, device, seed=args.seed)
    tile = default_tile(w.n)

    def engine():
        return critlayers.cka_matrix(feats, method="gram")

    def baseline():
        return [x @ x.T for x in feats]

    t0 = time.perf_counter()
    got = engine()
    synchronize(device)
    first_call = time.perf_counter() - t0
    layers = reference_layers(w)
    t0 = time.perf_counter()
    error = reference_error(got.cpu(), feats, layers)
    reference_s = time.perf_counter() - t0
    if not error <= args.atol:
        raise SystemExit(f"bench_engine_gpu: workload {w.name}: engine CKA differs from the "
                         f"float64 reference by {error:.3g} (> atol {args.atol:g})")

    engine_s = median_time(engine, device, args.min_run_time, args.warmup)
    baseline_s = median_time(baseline, device, args.min_run_time, args.warmup)
    peak_total, peak_extra = peak_memory(engine, device)
    flops = engine_flops(w.n_layers, w.n, w.d, tile)
    baseline_flops = 2.0 * w.n_layers * w.n * w.n * w.d
    return {
        "workload": w, "tile": tile, "error": error, "checked_layers": len(layers),
        "first_call_s": first_call, "reference_s": reference_s, "engine_s": engine_s,
        "baseline_s": baseline_s, "peak_total_gib": peak_total, "peak_extra_gib": peak_extra,
        "engine_tflops": flops / engine_s / 1e12, "baseline_tflops":
        baseline_flops / baseline_s / 1e12, "ratio": engine_s / baseline_s,
    }


def fmt_ms(seconds: float) -> str:
    return "inf (OOM)" if math.isinf(seconds) else f"{seconds * 1e3:.2f}"


def fmt_gib(gib: float) -> str:
    if math.isnan(gib):
        return "n/a"
    return "inf (OOM)" if math.isinf(gib) else f"{gib:.3f}"


def table(rows: list[dict]) -> str:
    head = ("| workload | layers x n x d | tile | max abs err (layers checked) | engine ms | "
            "engine TFLOP/s | peak GiB (above inputs) | x @ x.T ms | x @ x.T TFLOP/s | "
            "engine / x @ x.T |")
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        w = r["workload"]
        lines.append(
            f"| {w.name} | {w.n_layers} x {w.n} x {w.d} | {r['tile']} | "
            f"{r['error']:.2e} ({r['checked_layers']}) | {fmt_ms(r['engine_s'])} | "
            f"{r['engine_tflops']:.2f} | {fmt_gib(r['peak_total_gib'])} "
            f"({fmt_gib(r['peak_extra_gib'])}) | {fmt_ms(r['baseline_s'])} | "
            f"{r['baseline_tflops']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def header(device: torch.device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return "\n".join([
        f"# critlayers engine benchmark ({'quick' if args.quick else 'full'} workloads)",
        "",
        f"- device: {device} ({name or 'unknown'})",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), python "
        f"{platform.python_version()}, critlayers._C built with CUDA: "
        f"{critlayers._ext.load().built_with_cuda()}",
        f"- float32 matmul TF32: {torch.backends.cuda.matmul.allow_tf32}; "
        f"engine: cka_matrix(method='gram'), default tile; median of torch.utils.benchmark "
        f"after {args.warmup} warm-up calls",
        "- TFLOP/s count the Gram products only: engine 2 t_i t_j d per layer and visited tile "
        "(upper triangle), baseline 2 n^2 d per layer",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small workloads (CPU smoke run)")
    parser.add_argument("--workloads", default="ABCD", help="subset of A, B, C, D")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timed calls per measurement")
    parser.add_argument("--atol", type=float, default=2e-4,
                        help="largest accepted |engine - reference| of a CKA value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_engine_gpu: --device cuda but torch sees no GPU; "
                         "use --device cpu --quick for a smoke run")
    if device.type == "cuda" and not critlayers._ext.load().built_with_cuda():
        raise SystemExit("bench_engine_gpu: critlayers._C was built without its CUDA half; "
                         "rebuild with CRITLAYERS_FORCE_CUDA=1")
    torch.backends.cuda.matmul.allow_tf32 = False
    chosen = [w for w in (QUICK_WORKLOADS if args.quick else WORKLOADS)
              if w.name in args.workloads.upper()]
    if not chosen:
        raise SystemExit(f"bench_engine_gpu: --workloads {args.workloads!r} selects nothing")

    rows = []
    for w in chosen:
        t0 = time.perf_counter()
        r = run_workload(w, device, args)
        rows.append(r)
        print(f"workload {w.name}: max abs err {r['error']:.2e} on {r['checked_layers']} layers "
              f"(reference {r['reference_s']:.1f} s, first call {r['first_call_s']:.2f} s), "
              f"engine {fmt_ms(r['engine_s'])} ms, baseline {fmt_ms(r['baseline_s'])} ms, "
              f"{time.perf_counter() - t0:.1f} s in all", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = header(device, args) + "\n\n" + table(rows) + "\n"
    print(report)
    if args.out is not None:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
