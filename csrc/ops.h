// Op entry points with argument checks (critlayers.cpp), and the helper that registers them
// for one backend. The schema lives in critlayers.cpp; cpu/ and cuda/ call
// register_backend_ops with their kernels.
#pragma once

#include <torch/library.h>

#include <string>

#include "engine.h"

namespace critlayers {
namespace ops {

at::Tensor gram_hsic(const Kernels& kernels, at::TensorList feats, c10::string_view kernel,
                     at::ArrayRef<double> gammas, bool unbiased, int64_t tile);
void gram_hsic_accumulate(const Kernels& kernels, const at::Tensor& out, at::TensorList feats,
                          c10::string_view kernel, at::ArrayRef<double> gammas, bool unbiased,
                          int64_t tile, double alpha);
at::Tensor gram_pair_hsic(const Kernels& kernels, const at::Tensor& grams_x,
                          const at::Tensor& grams_y, bool unbiased, int64_t block_rows);
at::Tensor center_gram(const Kernels& kernels, const at::Tensor& gram, bool unbiased);
void feature_moments_accumulate(const Kernels& kernels, at::TensorList feats, at::TensorList shifts,
                                at::IntArrayRef pair_a, at::IntArrayRef pair_b,
                                at::TensorList cross, at::TensorList va, at::TensorList vb,
                                at::TensorList colsum, const at::Tensor& qq, const at::Tensor& qsum,
                                int64_t chunk_rows);

}  // namespace ops

template <const Kernels& (*GetKernels)()>
void register_backend_ops(torch::Library& m) {
  m.impl("gram_hsic", [](at::TensorList feats, c10::string_view kernel, at::ArrayRef<double> gammas,
                         bool unbiased, int64_t tile) {
    return ops::gram_hsic(GetKernels(), feats, kernel, gammas, unbiased, tile);
  });
  m.impl("gram_hsic_accumulate", [](const at::Tensor& out, at::TensorList feats,
                                    c10::string_view kernel, at::ArrayRef<double> gammas,
                                    bool unbiased, int64_t tile, double alpha) {
    ops::gram_hsic_accumulate(GetKernels(), out, feats, kernel, gammas, unbiased, tile, alpha);
  });
  m.impl("gram_pair_hsic", [](const at::Tensor& grams_x, const at::Tensor& grams_y, bool unbiased,
                              int64_t block_rows) {
    return ops::gram_pair_hsic(GetKernels(), grams_x, grams_y, unbiased, block_rows);
  });
  m.impl("center_gram", [](const at::Tensor& gram, bool unbiased) {
    return ops::center_gram(GetKernels(), gram, unbiased);
  });
  m.impl(
      "feature_moments_accumulate",
      [](at::TensorList feats, at::TensorList shifts, at::IntArrayRef pair_a,
         at::IntArrayRef pair_b, at::TensorList cross, at::TensorList va, at::TensorList vb,
         at::TensorList colsum, const at::Tensor& qq, const at::Tensor& qsum, int64_t chunk_rows) {
        ops::feature_moments_accumulate(GetKernels(), feats, shifts, pair_a, pair_b, cross, va, vb,
                                        colsum, qq, qsum, chunk_rows);
      });
}

}  // namespace critlayers
