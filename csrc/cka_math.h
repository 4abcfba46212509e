// Per-element math shared by the CPU and CUDA halves of the CKA engine.
//
// Every function here is inline and callable from host and device code, so the CPU tests
// exercise exactly the arithmetic that the GPU kernels run.
//
// Notation: K is an n x n Gram matrix of one layer; "offsets" u_i are per-row corrections such
// that the centred Gram is K_ij - u_i - u_j (and, for the unbiased estimator, 0 on the
// diagonal). Offsets are kept in float64; tiles are computed in the compute type (float32 for
// 16- and 32-bit inputs, float64 for float64 inputs).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CL_HOST_DEVICE inline
#endif

namespace critlayers {
namespace math {

// One feature of a row, shifted and scaled in float64 before rounding to the compute type:
// x_hat = (x - mean) * inv_scale. Centring before the Gram is formed keeps float32 products
// free of the cancellation that uncentred activations (large shared offsets) would cause.
template <typename acc_t, typename scalar_t>
CL_HOST_DEVICE acc_t centred_feature(scalar_t x, double mean, double inv_scale) {
  return static_cast<acc_t>((static_cast<double>(x) - mean) * inv_scale);
}

// Squared Euclidean distance from squared norms and a dot product, clamped at 0 because
// rounding can make the expansion slightly negative for near-identical rows.
template <typename acc_t>
CL_HOST_DEVICE acc_t sq_distance(acc_t sq_norm_i, acc_t sq_norm_j, acc_t dot) {
  acc_t d2 = sq_norm_i + sq_norm_j - acc_t(2) * dot;
  return d2 > acc_t(0) ? d2 : acc_t(0);
}

// RBF kernel value exp(-gamma * d2) with gamma = 1 / (2 sigma^2). The exponential is taken in
// float64 on both halves, so CPU and GPU agree to the last bit of the rounded result.
template <typename acc_t>
CL_HOST_DEVICE acc_t rbf_value(acc_t d2, acc_t gamma) {
  return static_cast<acc_t>(exp(-static_cast<double>(gamma) * static_cast<double>(d2)));
}

// Biased (double) centring H K H in offset form: (HKH)_ij = K_ij - r_i/n - r_j/n + R/n^2,
// with r_i the row sums of K and R their total; split as u_i = r_i/n - R/(2 n^2).
CL_HOST_DEVICE double biased_offset(double row_sum, double total, double n) {
  return row_sum / n - total / (2.0 * n * n);
}

// U-centring (Song et al. 2012) in offset form. With K~ the Gram with zeroed diagonal, r~_i
// its row sums and R~ their total, the U-centred Gram is K~_ij - m_i - m_j off the diagonal and
// 0 on it, where m_i = r~_i/(n-2) - R~/(2 (n-1)(n-2)).
CL_HOST_DEVICE double unbiased_offset(double row_sum_offdiag, double total_offdiag, double n) {
  return row_sum_offdiag / (n - 2.0) - total_offdiag / (2.0 * (n - 1.0) * (n - 2.0));
}

// One centred Gram entry from the raw entry and the two offsets; the unbiased estimator
// zeroes the diagonal.
template <typename acc_t>
CL_HOST_DEVICE double centred_entry(acc_t k, double u_i, double u_j, bool on_diagonal,
                                    bool unbiased) {
  if (unbiased && on_diagonal) {
    return 0.0;
  }
  return static_cast<double>(k) - u_i - u_j;
}

}  // namespace math
}  // namespace critlayers
