#!/usr/bin/env bash
# Compile check of the CUDA half of the engine, for machines without a GPU.
#
# Builds critlayers._C with its CUDA sources against a CUDA build of torch, out of tree (the
# checkout's own build is left alone), imports it and checks that every op has a CUDA kernel
# registered. Nothing runs on a GPU. Skips, exiting 0, when no nvcc is found.
#
# Environment:
#   CRITLAYERS_CUDA_VENV  virtual environment for the CUDA torch (default
#                         /tmp/critlayers-cuda-venv); reused when it already holds the torch
#   CUDA_HOME             CUDA toolkit holding bin/nvcc (default /usr/local/cuda, else the
#                         toolkit of the nvcc on PATH)
#   PYTHON                interpreter that creates the venv (default python3)
#   MAX_JOBS              parallel compile jobs (default 2)
#   KEEP_BUILD=1          keep the temporary build folder and print its path
set -euo pipefail

readonly TORCH_VERSION="2.14.1"
readonly ARCH_LIST="9.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=${SECONDS}

step() { printf '[cuda-build-check %4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
  step "FAILED: $*" >&2
  exit 1
}

if [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
elif command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
else
  step "no nvcc (neither ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc nor one on PATH):" \
    "skipping the CUDA compile check"
  exit 0
fi
export CUDA_HOME
nvcc_release="$("${CUDA_HOME}/bin/nvcc" --version | grep -o 'release [0-9.]*')"
step "nvcc: ${CUDA_HOME}/bin/nvcc (${nvcc_release})"

VENV="${CRITLAYERS_CUDA_VENV:-/tmp/critlayers-cuda-venv}"
VPY="${VENV}/bin/python"
has_cuda_torch() {
  [[ -x "${VPY}" ]] && "${VPY}" - "${TORCH_VERSION}" <<'EOF' >/dev/null 2>&1
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}

if has_cuda_torch && "${VPY}" -c "import ninja, numpy, setuptools" >/dev/null 2>&1; then
  step "reusing ${VENV} (torch ${TORCH_VERSION} with CUDA)"
else
  if [[ ! -x "${VPY}" ]]; then
    step "creating ${VENV}"
    "${PYTHON:-python3}" -m venv "${VENV}" || fail "could not create the venv ${VENV}"
  fi
  step "installing torch==${TORCH_VERSION} ninja numpy setuptools wheel into ${VENV}"
  pip_log="$(mktemp "${TMPDIR:-/tmp}/critlayers-cuda-pip.XXXXXX.log")"
  "${VPY}" -m pip install --disable-pip-version-check \
    "torch==${TORCH_VERSION}" ninja numpy setuptools wheel >"${pip_log}" 2>&1 || {
    tail -n 40 "${pip_log}" >&2
    fail "pip could not install torch==${TORCH_VERSION} into ${VENV} (log above)"
  }
  rm -f "${pip_log}"
  has_cuda_torch || fail "${VENV} has no CUDA build of torch ${TORCH_VERSION}"
fi
"${VPY}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The pip CUDA toolkit keeps the headers of cuBLAS, cuSPARSE and cuSOLVER (which ATen's CUDA
# headers include) in the nvidia packages, not in CUDA_HOME.
CUDA_INCLUDE="$("${VPY}" "${ROOT}/.ci/cuda_include_dirs.py")"
for header in cublas_v2.h cusparse.h cusolverDn.h; do
  found=""
  IFS=':' read -r -a dirs <<<"${CUDA_INCLUDE}:${CUDA_HOME}/include"
  for dir in "${dirs[@]}"; do
    [[ -n "${dir}" && -f "${dir}/${header}" ]] && found="${dir}" && break
  done
  [[ -n "${found}" ]] || fail "${header} is neither in ${CUDA_HOME}/include nor in ${CUDA_INCLUDE}"
done
step "extra CUDA include folders: ${CUDA_INCLUDE:-none}"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/critlayers-cuda-build.XXXXXX")"
if [[ "${KEEP_BUILD:-0}" == "1" ]]; then
  trap 'step "build kept in ${BUILD}"' EXIT
else
  trap 'rm -rf "${BUILD}"' EXIT
fi
cp "${ROOT}/setup.py" "${BUILD}/"
[[ -f "${ROOT}/README.md" ]] && cp "${ROOT}/README.md" "${BUILD}/"
cp -r "${ROOT}/csrc" "${BUILD}/csrc"
mkdir "${BUILD}/critlayers"
(cd "${ROOT}/critlayers" && tar cf - --exclude='__pycache__' --exclude='*.so' .) |
  (cd "${BUILD}/critlayers" && tar xf -)

step "building critlayers._C with CUDA (arch ${ARCH_LIST}, MAX_JOBS=${MAX_JOBS:-2}) in ${BUILD}"
build_start=${SECONDS}
(
  cd "${BUILD}"
  CRITLAYERS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCH_LIST}" MAX_JOBS="${MAX_JOBS:-2}" \
    CRITLAYERS_CUDA_INCLUDE="${CUDA_INCLUDE}" PATH="${CUDA_HOME}/bin:${PATH}" \
    "${VPY}" setup.py build_ext --inplace >build.log 2>&1
) || {
  tail -n 60 "${BUILD}/build.log" >&2
  fail "the CUDA build failed (log above)"
}
step "built in $((SECONDS - build_start)) s: $(cd "${BUILD}" && ls critlayers/_C*.so)"

step "importing the module and checking the registered kernels"
(cd "${BUILD}" && PYTHONPATH="${BUILD}" "${VPY}" - <<'EOF') || fail "the import check failed"
import torch

import critlayers
import critlayers._C as ext
from critlayers import reference

ops = ["gram_hsic", "gram_hsic_accumulate", "gram_pair_hsic", "center_gram",
       "feature_moments_accumulate"]
problems = []
if not ext.built_with_cuda():
    problems.append("critlayers._C.built_with_cuda() is False")
for op in ops:
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"critlayers::{op}", key):
            problems.append(f"critlayers::{op} has no {key} kernel")

# The CPU half of the same binary still computes CKA correctly.
torch.manual_seed(0)
feats = [torch.randn(64, 16), torch.randn(64, 24)]
got = critlayers.cka_matrix(feats)
want = torch.as_tensor(reference.cka_matrix(feats))
if not torch.allclose(got.cpu().double(), want.double(), atol=1e-6):
    problems.append(f"CPU cka_matrix differs from the reference: {got} vs {want}")
if problems:
    raise SystemExit("\n".join(problems))
print(f"built_with_cuda() = True; {len(ops)} ops have CPU and CUDA kernels; "
      "CPU cka_matrix matches the reference")
EOF
step "OK: CUDA build and import check passed in $((SECONDS - START)) s"
