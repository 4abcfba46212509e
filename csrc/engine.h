// Declarations shared by the op schema (critlayers.cpp), the device-agnostic drivers
// (engine.cpp) and the per-backend kernels (cpu/, cuda/).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace critlayers {

// A block of the upper triangle of an n x n Gram: rows [i0, i0 + ti), columns [j0, j0 + tj),
// and where its centred values start in a layer's store.
struct Block {
  int64_t i0, ti, j0, tj, offset;
};

// The kernels each backend provides. The drivers form each block of a Gram with product_nt and
// hand it to the element-wise kernels straight from its product, so no uncentred Gram is kept
// and no n x n centring matrix exists.
struct Kernels {
  // out (m, n) = a (m, k) b (n, k)^T in a's dtype: the Gram products. out may be a view with
  // unit column stride.
  void (*product_nt)(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
  // Column statistics of x (n, d), any float dtype and strides, about its first row x_0:
  // sums (d,) float64 = sum_r (x_r - x_0), sum_squares (d,) float64 = sum_r (x_r - x_0)^2.
  // Shifting by a row keeps the variance free of cancellation when the mean is large.
  void (*column_moments)(const at::Tensor& x, at::Tensor& sums, at::Tensor& sum_squares);
  // out (rows, d) = (x[row0 : row0 + rows] - mean) * inv_scale, in out's dtype, and
  // sq_norms (rows,) float64 = the squared norms of the rows as stored in out.
  // x: (n, d), any float dtype and strides; mean: (d,) float64.
  void (*centre_rows)(const at::Tensor& x, int64_t row0, int64_t rows, const at::Tensor& mean,
                      double inv_scale, at::Tensor& out, at::Tensor& sq_norms);
  // out64 (ti, tj) = centred kernel values of one tile of the Gram, float64 (or, where
  // compact_stores, the Gram's dtype: each value formed in float64, then rounded).
  // gram: (ti, tj) dot products of centred rows; for the RBF kernel sq_rows (ti,) and
  // sq_cols (tj,) are the rows' squared norms and gamma = 1 / (2 sigma^2). offsets_rows (ti,)
  // and offsets_cols (tj,) are float64 (see cka_math.h). Entry (r, c) of the tile lies on the
  // full Gram's diagonal when c - r == diagonal_shift (row offset minus column offset).
  void (*centre_tile)(const at::Tensor& gram, bool rbf, const at::Tensor& sq_rows,
                      const at::Tensor& sq_cols, double gamma, const at::Tensor& offsets_rows,
                      const at::Tensor& offsets_cols, int64_t diagonal_shift, bool unbiased,
                      at::Tensor& out64);
  // store (area,) = the centred values of every block of the upper triangle of a layer's
  // Gram, each written row-major from block.offset on, in the Gram's dtype (each value formed
  // in float64, then rounded). gram (n, n) holds the blocks' dot products; blocks are those of
  // the whole-layer schedule: square blocks on the diagonal and blocks right of them, which
  // together cover the upper triangle once. The Gram's row sums, and from them the centring
  // offsets (cka_math.h), come from the blocks; the unbiased estimator zeroes the diagonal.
  // Optional (nullptr): the engine then computes the offsets with ATen and calls centre_tile
  // per block, into a float64 store.
  void (*centre_blocks)(const at::Tensor& gram, bool unbiased, const std::vector<Block>& blocks,
                        at::Tensor& store);
  // acc (m, m) float64 += weight * stores stores^T, for stores (m, k) with unit column stride:
  // the HSIC sums of m layers over k stored Gram entries. Stores are float64, or float32 where
  // compact_stores; products and sums are float64 either way.
  void (*store_products)(const at::Tensor& stores, double weight, at::Tensor& acc);
  // Whether centre_tile, centre_blocks and store_products take stores in the compute type
  // (float32 for float32 Grams), which halves the memory the HSIC products stream through;
  // otherwise the engine's stores are float64. The rounding of a centred value to float32 is
  // below the error of the float32 product it comes from; products and sums stay float64.
  bool compact_stores;
};

// column_moments from ATen operations, for backends where memory bandwidth makes a dedicated
// kernel unnecessary. Reads x in chunks of rows, so no float64 copy of x exists.
void generic_column_moments(const at::Tensor& x, at::Tensor& sums, at::Tensor& sum_squares);

// product_nt and store_products as ATen matrix products (MKL, cuBLAS), for backends without
// dedicated kernels.
void generic_product_nt(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);
void generic_store_products(const at::Tensor& stores, double weight, at::Tensor& acc);

const Kernels& cpu_kernels();
// Makes cpu_kernels() leave out the optional fast paths (as the CUDA half does), so that the
// engine's generic compositions can be tested on the CPU.
void use_generic_cpu_kernels(bool generic);
// Where the CPU half's float32 Gram products of rows of `width` features run: "onednn"
// (torch's oneDNN linear op) or "blas" (at::mm_out, i.e. MKL or the BLAS torch was built with).
const char* cpu_product_backend(int64_t width);
// Sets the rule behind cpu_product_backend: "auto" (the measured default, cpu/kernels.cpp),
// "blas" or "onednn". The environment variable CRITLAYERS_CPU_GEMM gives the initial value.
void set_cpu_product_backend(const std::string& name);
// Whether torch has the oneDNN linear op the CPU half can use.
bool cpu_has_onednn();
#ifdef CRITLAYERS_WITH_CUDA
const Kernels& cuda_kernels();
#endif

// out (n_layers, n_layers) float64 += alpha * <Kc_a, Kc_b>_F for every pair of layers,
// where Kc is the centred (biased) or U-centred (unbiased) Gram of each layer.
void gram_hsic_accumulate(const Kernels& kernels, const at::Tensor& out, at::TensorList feats,
                          const std::string& kernel, at::ArrayRef<double> gammas, bool unbiased,
                          int64_t tile, double alpha);

// (n_x, n_y) float64 matrix of <Kc_a, Lc_b>_F for stacked Grams grams_x (n_x, n, n) and
// grams_y (n_y, n, n), processed in blocks of rows so that no centred copy of all Grams exists.
at::Tensor gram_pair_hsic(const Kernels& kernels, const at::Tensor& grams_x,
                          const at::Tensor& grams_y, bool unbiased, int64_t block_rows);

// Centred (biased) or U-centred (unbiased) copy of one Gram matrix (n, n), float64.
at::Tensor center_gram(const Kernels& kernels, const at::Tensor& gram, bool unbiased);

// Streams one batch of rows into the feature-space moments of linear CKA. For each pair p of
// layers (a, b) = (pair_a[p], pair_b[p]), with x_hat = x - shift:
//   cross[p] += x_hat_a^T x_hat_b      (d_a, d_b)
//   va[p]    += x_hat_a^T q_b          (d_a,)   q_l = row-wise squared norms of x_hat_l
//   vb[p]    += x_hat_b^T q_a          (d_b,)
// and for every layer l: colsum[l] += sum of rows of x_hat_l; qsum[l] += sum of q_l;
// qq (n_layers, n_layers) += Q^T Q with Q = [q_0 ... q_{n_layers - 1}]. All state float64.
void feature_moments_accumulate(const Kernels& kernels, at::TensorList feats, at::TensorList shifts,
                                at::IntArrayRef pair_a, at::IntArrayRef pair_b,
                                at::TensorList cross, at::TensorList va, at::TensorList vb,
                                at::TensorList colsum, const at::Tensor& qq, const at::Tensor& qsum,
                                int64_t chunk_rows);

}  // namespace critlayers
