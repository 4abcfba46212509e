// CPU half of the CKA engine: the element-wise kernels of engine.h and the op registrations
// for CPU tensors. Matrix products run in MKL through ATen; the loops here are parallelised
// over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../cka_math.h"
#include "../engine.h"
#include "../ops.h"

namespace critlayers {
namespace {

using at::Tensor;

// centre_rows: out[r, c] = (x[row0 + r, c] - mean[c]) * inv_scale.
// Each task owns a contiguous range of rows; arithmetic in float64, stored as acc_t.
template <typename scalar_t, typename acc_t>
void centre_rows_loop(const Tensor& x, int64_t row0, int64_t rows, const Tensor& mean,
                      double inv_scale, Tensor& out) {
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const double* mean_data = mean.data_ptr<double>();
  acc_t* out_data = out.data_ptr<acc_t>();
  const int64_t d = x.size(1);
  const int64_t x_row_stride = x.stride(0);
  const int64_t x_col_stride = x.stride(1);
  const int64_t out_row_stride = out.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x_data + (row0 + r) * x_row_stride;
      acc_t* dst = out_data + r * out_row_stride;
      for (int64_t c = 0; c < d; ++c) {
        dst[c] = math::centred_feature<acc_t>(src[c * x_col_stride], mean_data[c], inv_scale);
      }
    }
  });
}

void centre_rows_cpu(const Tensor& x, int64_t row0, int64_t rows, const Tensor& mean,
                     double inv_scale, Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && mean.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centre_rows", [&] {
    if (out.scalar_type() == at::kDouble) {
      centre_rows_loop<scalar_t, double>(x, row0, rows, mean, inv_scale, out);
    } else {
      centre_rows_loop<scalar_t, float>(x, row0, rows, mean, inv_scale, out);
    }
  });
}

// centre_tile: out64[r, c] = centred kernel value of Gram entry (r, c) of one tile.
// Linear: K = gram; RBF: K = exp(-gamma * |x_r - x_c|^2) from the dot products and the
// squared norms. Then K - u_r - u_c, and 0 on the full Gram's diagonal for the unbiased
// estimator (entry (r, c) lies on it when c - r == diagonal_shift). Each task owns rows;
// distances and exponentials in the tile's type, the centred value in float64.
template <typename scalar_t>
void centre_tile_loop(const Tensor& gram, bool rbf, const Tensor& sq_rows, const Tensor& sq_cols,
                      double gamma, const Tensor& offsets_rows, const Tensor& offsets_cols,
                      int64_t diagonal_shift, bool unbiased, Tensor& out64) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ti = gram.size(0);
  const int64_t tj = gram.size(1);
  const scalar_t* g = gram.data_ptr<scalar_t>();
  const int64_t g_row_stride = gram.stride(0);
  const int64_t g_col_stride = gram.stride(1);
  const double* u_rows = offsets_rows.data_ptr<double>();
  const double* u_cols = offsets_cols.data_ptr<double>();
  const double* q_rows = rbf ? sq_rows.data_ptr<double>() : nullptr;
  const double* q_cols = rbf ? sq_cols.data_ptr<double>() : nullptr;
  double* out = out64.data_ptr<double>();
  const int64_t out_row_stride = out64.stride(0);
  const acc_t gamma_acc = static_cast<acc_t>(gamma);
  at::parallel_for(0, ti, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g_row = g + r * g_row_stride;
      double* out_row = out + r * out_row_stride;
      const double u_r = u_rows[r];
      const int64_t diag_col = r + diagonal_shift;
      if (rbf) {
        const acc_t q_r = static_cast<acc_t>(q_rows[r]);
        for (int64_t c = 0; c < tj; ++c) {
          const acc_t d2 = c == diag_col ? acc_t(0)
                                         : math::sq_distance<acc_t>(
                                               q_r, static_cast<acc_t>(q_cols[c]),
                                               static_cast<acc_t>(g_row[c * g_col_stride]));
          out_row[c] = math::centred_entry<acc_t>(math::rbf_value<acc_t>(d2, gamma_acc), u_r,
                                                  u_cols[c], c == diag_col, unbiased);
        }
      } else {
        for (int64_t c = 0; c < tj; ++c) {
          out_row[c] = math::centred_entry<acc_t>(static_cast<acc_t>(g_row[c * g_col_stride]),
                                                  u_r, u_cols[c], false, false);
        }
        if (unbiased && diag_col >= 0 && diag_col < tj) {
          out_row[diag_col] = math::centred_entry<acc_t>(acc_t(0), u_r, u_r, true, true);
        }
      }
    }
  });
}

void centre_tile_cpu(const Tensor& gram, bool rbf, const Tensor& sq_rows, const Tensor& sq_cols,
                     double gamma, const Tensor& offsets_rows, const Tensor& offsets_cols,
                     int64_t diagonal_shift, bool unbiased, Tensor& out64) {
  TORCH_INTERNAL_ASSERT(out64.stride(1) == 1 && offsets_rows.is_contiguous() &&
                        offsets_cols.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "centre_tile",
                                  [&] {
                                    centre_tile_loop<scalar_t>(gram, rbf, sq_rows, sq_cols, gamma,
                                                               offsets_rows, offsets_cols,
                                                               diagonal_shift, unbiased, out64);
                                  });
}

}  // namespace

const Kernels& cpu_kernels() {
  static const Kernels kernels{&centre_rows_cpu, &centre_tile_cpu};
  return kernels;
}

TORCH_LIBRARY_IMPL(critlayers, CPU, m) { register_backend_ops<&cpu_kernels>(m); }

}  // namespace critlayers
