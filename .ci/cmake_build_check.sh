#!/usr/bin/env bash
# Build check of CMakeLists.txt: configures and builds the engine as the plain C++ shared
# library (CRITLAYERS_PYTHON_MODULE left OFF) on the CPU, checks that it depends on neither
# libpython nor torch_python, loads it with torch.ops.load_library in a fresh interpreter
# (without the Python package, whose own extension would register the same ops) and compares
# its ops with the float64 reference.
#
# Environment:
#   PYTHON                   interpreter with torch (default: the checkout's .venv, else python3)
#   CRITLAYERS_CMAKE_BUILD   build folder (default /tmp/cmake-build; emptied first)
#   CRITLAYERS_WITH_CUDA     passed to CMake (default OFF: this is the CPU check)
#   MAX_JOBS                 parallel compile jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=${SECONDS}

step() { printf '[cmake-build-check %4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
  step "FAILED: $*" >&2
  exit 1
}

if [[ -n "${PYTHON:-}" ]]; then
  PY="${PYTHON}"
elif [[ -x "${ROOT}/.venv/bin/python" ]]; then
  PY="${ROOT}/.venv/bin/python"
else
  PY="python3"
fi
command -v cmake >/dev/null 2>&1 || fail "cmake is not on PATH"
TORCH_PREFIX="$("${PY}" -c 'import torch; print(torch.utils.cmake_prefix_path)')" ||
  fail "${PY} cannot import torch"
BUILD="${CRITLAYERS_CMAKE_BUILD:-/tmp/cmake-build}"
step "$(cmake --version | head -n 1); python ${PY}; torch prefix ${TORCH_PREFIX}"

step "configuring into ${BUILD}"
rm -rf "${BUILD}"
cmake -S "${ROOT}" -B "${BUILD}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="${TORCH_PREFIX}" \
  -DCRITLAYERS_WITH_CUDA="${CRITLAYERS_WITH_CUDA:-OFF}" \
  >"${BUILD}.configure.log" 2>&1 || {
  cat "${BUILD}.configure.log" >&2
  fail "cmake configure failed (log above)"
}
grep 'critlayers:' "${BUILD}.configure.log" || true

step "building with ${MAX_JOBS:-2} jobs"
cmake --build "${BUILD}" --parallel "${MAX_JOBS:-2}" >"${BUILD}.build.log" 2>&1 || {
  tail -n 60 "${BUILD}.build.log" >&2
  fail "cmake build failed (log above)"
}
LIB="${BUILD}/libcritlayers.so"
[[ -f "${LIB}" ]] || fail "the build did not produce ${LIB}"
step "built ${LIB}"

needed="$(readelf -d "${LIB}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
step "NEEDED: ${needed}"
if grep -Eq 'libpython|libtorch_python' <<<"${needed}"; then
  fail "${LIB} links Python (${needed}); the C++ library must link only torch"
fi
if nm -D --defined-only "${LIB}" | grep 'PyInit_' >/dev/null; then
  fail "${LIB} defines a Python module entry point; the C++ library must not"
fi

step "loading it with torch.ops.load_library and checking the CPU ops against the reference"
"${PY}" - "${LIB}" "${ROOT}/critlayers/reference.py" <<'EOF' || fail "the load check failed"
import importlib.util
import sys

import torch

lib, reference_path = sys.argv[1], sys.argv[2]
torch.ops.load_library(lib)
spec = importlib.util.spec_from_file_location("critlayers_reference", reference_path)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

ops = torch.ops.critlayers
torch.manual_seed(0)
n = 40
# float32, bfloat16 and a transposed (non-contiguous) layer.
feats = [torch.randn(n, 12), torch.randn(n, 7).to(torch.bfloat16), torch.randn(9, n).T]
feats64 = [x.double() for x in feats]
grams = [ref.gram_linear(x) for x in feats64]
problems = []


def inner(a, b, unbiased):
    return float((ref.center_gram(a, unbiased) * ref.center_gram(b, unbiased)).sum())


for unbiased in (False, True):
    got = ops.gram_hsic(feats, "linear", [], unbiased, 16)
    want = torch.tensor([[inner(a, b, unbiased) for b in grams] for a in grams],
                        dtype=torch.float64)
    err = float(((got + got.T) / 2 - want).abs().max() / want.abs().max())
    if not err < 1e-5:
        problems.append(f"gram_hsic(unbiased={unbiased}): relative error {err:.3g}")
    centred = ops.center_gram(grams[0], unbiased)
    err = float((centred - ref.center_gram(grams[0], unbiased)).abs().max())
    if not err < 1e-9:
        problems.append(f"center_gram(unbiased={unbiased}): error {err:.3g}")

for name in ("gram_hsic", "gram_hsic_accumulate", "gram_pair_hsic", "center_gram",
             "feature_moments_accumulate"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"critlayers::{name}", "CPU"):
        problems.append(f"critlayers::{name} has no CPU kernel")
if problems:
    raise SystemExit("\n".join(problems))
print("ops registered; gram_hsic and center_gram match the float64 reference")
EOF
step "OK: CMake build and load check passed in $((SECONDS - START)) s"
