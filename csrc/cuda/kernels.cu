// CUDA half of the CKA engine: the element-wise kernels of engine.h and the op registrations
// for CUDA tensors. Matrix products run in cuBLAS through ATen; the kernels here run on the
// current stream of the input's device and share their arithmetic with the CPU half through
// cka_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../cka_math.h"
#include "../engine.h"
#include "../ops.h"

namespace critlayers {
namespace {

using at::Tensor;

// A block of 32 x 8 threads: a warp spans 32 consecutive columns of one row, so loads and
// stores along a row of a contiguous tensor are coalesced.
constexpr int kBlockCols = 32;
constexpr int kBlockRows = 8;
// gridDim.y is limited to 65535; taller matrices are covered by the grid-stride loop.
constexpr int64_t kMaxGridRows = 65535;
// Enough blocks along the columns to fill the device; wider rows use the grid-stride loop.
constexpr int64_t kMaxGridCols = 1024;
// Row kernels: one block per row, enough threads to cover typical widths in a few steps.
constexpr int kRowThreads = 256;
constexpr int kWarpSize = 32;
// More rows than blocks are covered by the grid-stride loop.
constexpr int64_t kMaxRowBlocks = 65535;

dim3 grid_for(int64_t rows, int64_t cols) {
  const int64_t grid_cols = std::min<int64_t>((cols + kBlockCols - 1) / kBlockCols, kMaxGridCols);
  const int64_t grid_rows = std::min<int64_t>((rows + kBlockRows - 1) / kBlockRows, kMaxGridRows);
  return dim3(static_cast<unsigned>(std::max<int64_t>(grid_cols, 1)),
              static_cast<unsigned>(std::max<int64_t>(grid_rows, 1)));
}

// Sum of v over the 32 lanes of a warp, in every lane (butterfly of shuffles).
__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// centre_rows, one block of kRowThreads threads per row:
//   out[r, c] = (x[row0 + r, c] - mean[c]) * inv_scale,   sq_norms[r] = sum_c out[r, c]^2.
// Block b owns rows r = b, b + gridDim.x, ...; thread t owns columns c = t, t + kRowThreads, ...
// of its block's row, so a row of a contiguous tensor is read and written in coalesced
// segments. The shift is float64 (math::centred_feature) and the result is stored as acc_t
// (float or double); the norm squares the stored value and accumulates in float64, per thread,
// then across each warp with shuffles and across the block's warps through shared memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    centre_rows_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride, int64_t x_col_stride,
                       int64_t row0, int64_t rows, int64_t d, const double* __restrict__ mean,
                       double inv_scale, acc_t* __restrict__ out, int64_t out_row_stride,
                       double* __restrict__ sq_norms, int64_t sq_stride) {
  constexpr int kWarps = kRowThreads / kWarpSize;
  __shared__ double warp_sums[kWarps];
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  // r depends only on the block, so every thread of a block takes the same trips through the
  // loop and reaches the barriers together.
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* src = x + (row0 + r) * x_row_stride;
    acc_t* dst = out + r * out_row_stride;
    double sq = 0.0;
    for (int64_t c = threadIdx.x; c < d; c += kRowThreads) {
      const acc_t v = math::centred_feature<acc_t>(src[c * x_col_stride], mean[c], inv_scale);
      dst[c] = v;
      sq += static_cast<double>(v) * static_cast<double>(v);
    }
    sq = warp_sum(sq);
    if (lane == 0) {
      warp_sums[warp] = sq;
    }
    __syncthreads();
    if (warp == 0) {
      sq = warp_sum(lane < kWarps ? warp_sums[lane] : 0.0);
      if (lane == 0) {
        sq_norms[r * sq_stride] = sq;
      }
    }
    // warp_sums is written again for the next row.
    __syncthreads();
  }
}

void centre_rows_cuda(const Tensor& x, int64_t row0, int64_t rows, const Tensor& mean,
                      double inv_scale, Tensor& out, Tensor& sq_norms) {
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && mean.is_contiguous());
  TORCH_INTERNAL_ASSERT(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble);
  TORCH_INTERNAL_ASSERT(sq_norms.scalar_type() == at::kDouble && sq_norms.dim() == 1 &&
                        sq_norms.size(0) == rows);
  if (rows == 0) {
    return;
  }
  const int64_t d = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(std::min(rows, kMaxRowBlocks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centre_rows", [&] {
    const auto launch = [&](auto* out_data) {
      using acc_t = std::remove_pointer_t<decltype(out_data)>;
      centre_rows_kernel<scalar_t, acc_t><<<grid, kRowThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), row0, rows, d, mean.data_ptr<double>(),
          inv_scale, out_data, out.stride(0), sq_norms.data_ptr<double>(), sq_norms.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (out.scalar_type() == at::kDouble) {
      launch(out.data_ptr<double>());
    } else {
      launch(out.data_ptr<float>());
    }
  });
}

// centre_tile: out64[r, c] = centred kernel value of Gram entry (r, c) of one tile.
// Linear: K = gram; RBF: K = exp(-gamma * |x_r - x_c|^2) from the dot products and the
// squared norms, with the distance taken as 0 on the full Gram's diagonal. Then K - u_r - u_c,
// and 0 on the diagonal for the unbiased estimator; entry (r, c) lies on the diagonal when
// c - r == diagonal_shift. Thread (tx, ty) of block (bx, by) owns entry (r, c) with
// c = bx * 32 + tx and r = by * 8 + ty, striding by the grid's extent. Distances in acc_t
// (float for 16- and 32-bit tiles, double for float64), the exponential (math::rbf_value) and
// the centred value in float64.
template <typename scalar_t, bool kRbf>
__global__ void centre_tile_kernel(
    const scalar_t* __restrict__ gram, int64_t g_row_stride, int64_t g_col_stride, int64_t ti,
    int64_t tj, const double* __restrict__ sq_rows, const double* __restrict__ sq_cols,
    double gamma, const double* __restrict__ u_rows, const double* __restrict__ u_cols,
    int64_t diagonal_shift, bool unbiased, double* __restrict__ out, int64_t out_row_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t gamma_acc = static_cast<acc_t>(gamma);
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < ti;
       r += row_step) {
    const scalar_t* g_row = gram + r * g_row_stride;
    double* out_row = out + r * out_row_stride;
    const double u_r = u_rows[r];
    const int64_t diag_col = r + diagonal_shift;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < tj;
         c += col_step) {
      const bool on_diagonal = c == diag_col;
      const acc_t g = static_cast<acc_t>(g_row[c * g_col_stride]);
      acc_t k = g;
      if (kRbf) {
        const acc_t d2 = on_diagonal ? acc_t(0)
                                     : math::sq_distance<acc_t>(static_cast<acc_t>(sq_rows[r]),
                                                                static_cast<acc_t>(sq_cols[c]), g);
        k = math::rbf_value<acc_t>(d2, gamma_acc);
      }
      out_row[c] = math::centred_entry<acc_t>(k, u_r, u_cols[c], on_diagonal, unbiased);
    }
  }
}

void centre_tile_cuda(const Tensor& gram, bool rbf, const Tensor& sq_rows, const Tensor& sq_cols,
                      double gamma, const Tensor& offsets_rows, const Tensor& offsets_cols,
                      int64_t diagonal_shift, bool unbiased, Tensor& out64) {
  TORCH_INTERNAL_ASSERT(out64.scalar_type() == at::kDouble && out64.stride(1) == 1 &&
                        offsets_rows.is_contiguous() && offsets_cols.is_contiguous());
  TORCH_INTERNAL_ASSERT(!rbf || (sq_rows.is_contiguous() && sq_cols.is_contiguous()));
  const int64_t ti = gram.size(0);
  const int64_t tj = gram.size(1);
  if (ti == 0 || tj == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(gram.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kBlockCols, kBlockRows);
  const dim3 grid = grid_for(ti, tj);
  const double* q_rows = rbf ? sq_rows.data_ptr<double>() : nullptr;
  const double* q_cols = rbf ? sq_cols.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "centre_tile", [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<grid, block, 0, stream>>>(
          gram.data_ptr<scalar_t>(), gram.stride(0), gram.stride(1), ti, tj, q_rows, q_cols, gamma,
          offsets_rows.data_ptr<double>(), offsets_cols.data_ptr<double>(), diagonal_shift,
          unbiased, out64.data_ptr<double>(), out64.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rbf) {
      launch(centre_tile_kernel<scalar_t, true>);
    } else {
      launch(centre_tile_kernel<scalar_t, false>);
    }
  });
}

}  // namespace

// The products go to cuBLAS and the column moments are a reduction that reads x once: ATen
// already runs them well, so they take the generic implementations. There is no centre_blocks
// kernel: the engine centres the whole-layer schedule's blocks one centre_tile call at a time.
const Kernels& cuda_kernels() {
  static const Kernels kernels{&generic_product_nt,
                               &generic_column_moments,
                               &centre_rows_cuda,
                               &centre_tile_cuda,
                               nullptr,
                               &generic_store_products,
                               /*compact_stores=*/false};
  return kernels;
}

TORCH_LIBRARY_IMPL(critlayers, CUDA, m) { register_backend_ops<&cuda_kernels>(m); }

}  // namespace critlayers
