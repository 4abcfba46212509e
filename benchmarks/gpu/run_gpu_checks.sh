#!/usr/bin/env bash
# The GPU checks of critlayers, in one run on a machine with an NVIDIA GPU (written for a
# Hopper H200): build the extension with its CUDA half in place, a CUDA smoke test, the
# engine tests (tests/test_engine.py, whose cuda cases run only where a GPU is seen) and the
# engine benchmark (benchmarks/bench_engine_gpu.py). See benchmarks/gpu/README.md.
#
# Every step runs even when an earlier one failed (except after a failed build); logs and the
# benchmark table go to $OUT (default results/gpu). Exits non-zero when any step failed.
#
# Environment:
#   PYTHON              interpreter with a CUDA build of torch (default python3)
#   CUDA_HOME           CUDA toolkit holding bin/nvcc (default /usr/local/cuda, else PATH's)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default 9.0, Hopper)
#   MAX_JOBS            parallel compile jobs (default: the number of cores, at most 16)
#   OUT                 folder for logs and results
#   BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT   seconds per step (default 300, 180, 240)
#   BENCH_ARGS          extra arguments for bench_engine_gpu.py
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${ROOT}"
OUT="${OUT:-${ROOT}/results/gpu}"
mkdir -p "${OUT}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
START=${SECONDS}
declare -a SUMMARY=()
STATUS=0

step() { printf '\n[gpu-checks %4ds] %s\n' "$((SECONDS - START))" "$*"; }
record() {
  local name="$1" rc="$2" began="$3"
  local verdict="ok"
  if [[ "${rc}" -ne 0 ]]; then
    verdict="FAILED (exit ${rc}$([[ "${rc}" -eq 124 ]] && echo ', timed out'))"
    STATUS=1
  fi
  SUMMARY+=("$(printf '%-10s %-32s %4ds' "${name}" "${verdict}" "$((SECONDS - began))")")
}
summary() {
  step "summary (logs in ${OUT})"
  printf '  %s\n' "${SUMMARY[@]}"
  exit "${STATUS}"
}

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "${PY}" -c "import sys, torch; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| GPU seen:', torch.cuda.is_available())"
} 2>&1 | tee "${OUT}/env.txt"

if [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
elif command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
  export CUDA_HOME
else
  echo "no nvcc found (CUDA_HOME=${CUDA_HOME:-unset}, none on PATH)" | tee -a "${OUT}/env.txt"
  record build 1 "${SECONDS}"
  summary
fi
"${CUDA_HOME}/bin/nvcc" --version | tail -n 2 | tee -a "${OUT}/env.txt"

# ATen's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers; pip-installed CUDA
# libraries keep them under site-packages/nvidia rather than in CUDA_HOME.
CUDA_INCLUDE="$("${PY}" "${ROOT}/.ci/cuda_include_dirs.py")"
echo "extra CUDA include folders: ${CUDA_INCLUDE:-none}" | tee -a "${OUT}/env.txt"

step "build: critlayers._C with CUDA, arch ${TORCH_CUDA_ARCH_LIST:-9.0}"
began=${SECONDS}
jobs="$(nproc)"
CRITLAYERS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-$((jobs < 16 ? jobs : 16))}" CRITLAYERS_CUDA_INCLUDE="${CUDA_INCLUDE}" \
  PATH="${CUDA_HOME}/bin:${PATH}" \
  timeout "${BUILD_TIMEOUT:-300}" "${PY}" setup.py build_ext --inplace >"${OUT}/build.log" 2>&1
rc=$?
record build "${rc}" "${began}"
if [[ "${rc}" -ne 0 ]]; then
  grep -E -m 20 'error|Error' "${OUT}/build.log"
  tail -n 40 "${OUT}/build.log"
  summary
fi
ls critlayers/_C*.so

step "smoke: the CUDA ops against the CPU ops"
began=${SECONDS}
"${PY}" - <<'EOF' 2>&1 | tee "${OUT}/smoke.log"
import torch

import critlayers
from critlayers import reference

assert critlayers._C.built_with_cuda(), "critlayers._C was built without its CUDA half"
assert torch.cuda.is_available(), "torch sees no GPU"
torch.manual_seed(0)
feats = [torch.randn(300, 48), torch.randn(300, 64).to(torch.bfloat16), torch.randn(96, 300).T]
for kernel in ("linear", "rbf"):
    for unbiased in (False, True):
        want = reference.cka_matrix(feats, kernel=kernel, unbiased=unbiased)
        got = critlayers.cka_matrix([x.cuda() for x in feats], kernel=kernel,
                                    unbiased=unbiased, method="gram")
        err = float((got.cpu() - want).abs().max())
        print(f"{kernel:6s} unbiased={unbiased!s:5s} max |cuda - reference| = {err:.2e}")
        assert got.is_cuda and err < 1e-3, (kernel, unbiased, err)
torch.cuda.synchronize()
print("smoke ok")
EOF
record smoke "$?" "${began}"

step "tests: tests/test_engine.py"
began=${SECONDS}
if [[ -f tests/test_engine.py ]]; then
  timeout "${TEST_TIMEOUT:-180}" "${PY}" -m pytest tests/test_engine.py -q -p no:cacheprovider \
    2>&1 | tee "${OUT}/tests.log"
  record tests "$?" "${began}"
else
  echo "tests/test_engine.py is not in this tree" | tee "${OUT}/tests.log"
  record tests 1 "${began}"
fi

step "benchmark: benchmarks/bench_engine_gpu.py"
began=${SECONDS}
# shellcheck disable=SC2086  # BENCH_ARGS holds several words on purpose
timeout "${BENCH_TIMEOUT:-240}" "${PY}" benchmarks/bench_engine_gpu.py --device cuda \
  --out "${OUT}/bench_engine_gpu.md" ${BENCH_ARGS:-} 2>&1 | tee "${OUT}/bench.log"
record bench "$?" "${began}"

summary
