// The op schema of the CKA engine, the checks on every argument, and the Python module.
//
// Ops are declared once with TORCH_LIBRARY and implemented per backend (cpu/, cuda/) with
// TORCH_LIBRARY_IMPL, so they dispatch on the device of their inputs and work under
// torch.compile. Checks raise ValueError (TORCH_CHECK_VALUE) for caller mistakes, naming the
// op, the argument and the value; TORCH_INTERNAL_ASSERT guards invariants.
#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#else
#include <ATen/ATen.h>
#endif
#include <torch/library.h>

#include <string>

#include "engine.h"
#include "ops.h"

namespace critlayers {
namespace {

using at::Tensor;

bool is_float(const Tensor& t) { return at::isFloatingType(t.scalar_type()); }

// Checks a list of feature matrices (n, d_l) that share n and a device; returns n.
int64_t check_feats(const char* op, at::TensorList feats) {
  TORCH_CHECK_VALUE(!feats.empty(), op, ": feats must hold at least one layer, got 0");
  const int64_t n = feats[0].dim() == 2 ? feats[0].size(0) : -1;
  for (size_t l = 0; l < feats.size(); ++l) {
    const Tensor& x = feats[l];
    TORCH_CHECK_VALUE(x.dim() == 2, op, ": feats[", l, "] must be 2-D (n, d), got shape ",
                      x.sizes());
    TORCH_CHECK_VALUE(is_float(x), op, ": feats[", l, "] must be floating point, got ",
                      x.scalar_type());
    TORCH_CHECK_VALUE(x.size(0) == n, op, ": feats[", l, "] has ", x.size(0),
                      " rows but feats[0] has ", n, "; every layer needs the same examples");
    TORCH_CHECK_VALUE(x.size(1) > 0, op, ": feats[", l, "] has no features (shape ", x.sizes(),
                      ")");
    TORCH_CHECK_VALUE(x.device() == feats[0].device(), op, ": feats[", l, "] is on ", x.device(),
                      " but feats[0] is on ", feats[0].device());
  }
  return n;
}

void check_n(const char* op, int64_t n, bool unbiased) {
  if (unbiased) {
    TORCH_CHECK_VALUE(n > 3, op, ": the unbiased estimator needs n > 3 examples, got n = ", n);
  } else {
    TORCH_CHECK_VALUE(n > 1, op, ": the biased estimator needs n > 1 examples, got n = ", n);
  }
}

void check_kernel(const char* op, c10::string_view kernel, at::ArrayRef<double> gammas,
                  size_t n_layers) {
  TORCH_CHECK_VALUE(kernel == "linear" || kernel == "rbf", op,
                    ": kernel must be 'linear' or 'rbf', got '", std::string(kernel), "'");
  if (kernel == "rbf") {
    TORCH_CHECK_VALUE(gammas.size() == n_layers, op, ": gammas must hold one value per layer (",
                      n_layers, "), got ", gammas.size());
    for (size_t l = 0; l < gammas.size(); ++l) {
      TORCH_CHECK_VALUE(std::isfinite(gammas[l]) && gammas[l] > 0, op, ": gammas[", l,
                        "] must be positive and finite, got ", gammas[l]);
    }
  }
}

void check_stacked_grams(const char* op, const char* arg, const Tensor& grams) {
  TORCH_CHECK_VALUE(grams.dim() == 3 && grams.size(1) == grams.size(2), op, ": ", arg,
                    " must be (n_layers, n, n), got shape ", grams.sizes());
  TORCH_CHECK_VALUE(is_float(grams), op, ": ", arg, " must be floating point, got ",
                    grams.scalar_type());
}

}  // namespace

namespace ops {

at::Tensor gram_hsic(const Kernels& kernels, at::TensorList feats, c10::string_view kernel,
                     at::ArrayRef<double> gammas, bool unbiased, int64_t tile) {
  const int64_t n_layers = static_cast<int64_t>(feats.size());
  Tensor out =
      at::zeros({n_layers, n_layers}, feats.empty() ? at::TensorOptions().dtype(at::kDouble)
                                                    : feats[0].options().dtype(at::kDouble));
  gram_hsic_accumulate(kernels, out, feats, kernel, gammas, unbiased, tile, 1.0);
  return out;
}

void gram_hsic_accumulate(const Kernels& kernels, const at::Tensor& out, at::TensorList feats,
                          c10::string_view kernel, at::ArrayRef<double> gammas, bool unbiased,
                          int64_t tile, double alpha) {
  const char* op = "critlayers::gram_hsic";
  const int64_t n = check_feats(op, feats);
  check_n(op, n, unbiased);
  check_kernel(op, kernel, gammas, feats.size());
  TORCH_CHECK_VALUE(tile > 0, op, ": tile must be positive, got ", tile);
  const int64_t n_layers = static_cast<int64_t>(feats.size());
  TORCH_CHECK_VALUE(out.scalar_type() == at::kDouble && out.dim() == 2 && out.size(0) == n_layers &&
                        out.size(1) == n_layers,
                    op, ": out must be a float64 (", n_layers, ", ", n_layers, ") tensor, got ",
                    out.scalar_type(), " of shape ", out.sizes());
  TORCH_CHECK_VALUE(out.device() == feats[0].device(), op, ": out is on ", out.device(),
                    " but feats are on ", feats[0].device());
  critlayers::gram_hsic_accumulate(kernels, out, feats, std::string(kernel), gammas, unbiased, tile,
                                   alpha);
}

at::Tensor gram_pair_hsic(const Kernels& kernels, const at::Tensor& grams_x,
                          const at::Tensor& grams_y, bool unbiased, int64_t block_rows) {
  const char* op = "critlayers::gram_pair_hsic";
  check_stacked_grams(op, "grams_x", grams_x);
  check_stacked_grams(op, "grams_y", grams_y);
  TORCH_CHECK_VALUE(grams_x.size(1) == grams_y.size(1), op, ": grams_x has n = ", grams_x.size(1),
                    " but grams_y has n = ", grams_y.size(1));
  TORCH_CHECK_VALUE(grams_x.device() == grams_y.device(), op, ": grams_x is on ", grams_x.device(),
                    " but grams_y is on ", grams_y.device());
  TORCH_CHECK_VALUE(block_rows > 0, op, ": block_rows must be positive, got ", block_rows);
  check_n(op, grams_x.size(1), unbiased);
  return critlayers::gram_pair_hsic(kernels, grams_x, grams_y, unbiased,
                                    std::min(block_rows, grams_x.size(1)));
}

at::Tensor center_gram(const Kernels& kernels, const at::Tensor& gram, bool unbiased) {
  const char* op = "critlayers::center_gram";
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), op,
                    ": gram must be square (n, n), got shape ", gram.sizes());
  TORCH_CHECK_VALUE(is_float(gram), op, ": gram must be floating point, got ", gram.scalar_type());
  check_n(op, gram.size(0), unbiased);
  return critlayers::center_gram(kernels, gram, unbiased);
}

void feature_moments_accumulate(const Kernels& kernels, at::TensorList feats, at::TensorList shifts,
                                at::IntArrayRef pair_a, at::IntArrayRef pair_b,
                                at::TensorList cross, at::TensorList va, at::TensorList vb,
                                at::TensorList colsum, const at::Tensor& qq, const at::Tensor& qsum,
                                int64_t chunk_rows) {
  const char* op = "critlayers::feature_moments_accumulate";
  check_feats(op, feats);
  const int64_t n_layers = static_cast<int64_t>(feats.size());
  TORCH_CHECK_VALUE(shifts.size() == feats.size() && colsum.size() == feats.size(), op,
                    ": shifts and colsum need one entry per layer (", n_layers, "), got ",
                    shifts.size(), " and ", colsum.size());
  const size_t n_pairs = pair_a.size();
  TORCH_CHECK_VALUE(pair_b.size() == n_pairs && cross.size() == n_pairs && va.size() == n_pairs &&
                        vb.size() == n_pairs,
                    op, ": pair_a, pair_b, cross, va and vb must have the same length, got ",
                    pair_a.size(), ", ", pair_b.size(), ", ", cross.size(), ", ", va.size(), ", ",
                    vb.size());
  TORCH_CHECK_VALUE(chunk_rows > 0, op, ": chunk_rows must be positive, got ", chunk_rows);
  auto check_state = [&](const char* arg, size_t i, const Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.sizes() == shape && t.is_contiguous() &&
                          t.device() == feats[0].device(),
                      op, ": ", arg, "[", i, "] must be a contiguous float64 tensor of shape ",
                      shape, " on ", feats[0].device(), ", got ", t.scalar_type(), " of shape ",
                      t.sizes(), " on ", t.device());
  };
  for (int64_t l = 0; l < n_layers; ++l) {
    check_state("shifts", l, shifts[l], {feats[l].size(1)});
    check_state("colsum", l, colsum[l], {feats[l].size(1)});
  }
  for (size_t p = 0; p < n_pairs; ++p) {
    TORCH_CHECK_VALUE(
        pair_a[p] >= 0 && pair_a[p] < n_layers && pair_b[p] >= 0 && pair_b[p] < n_layers, op,
        ": pair ", p, " = (", pair_a[p], ", ", pair_b[p], ") is out of range for ", n_layers,
        " layers");
    const int64_t da = feats[pair_a[p]].size(1);
    const int64_t db = feats[pair_b[p]].size(1);
    check_state("cross", p, cross[p], {da, db});
    check_state("va", p, va[p], {da});
    check_state("vb", p, vb[p], {db});
  }
  check_state("qq", 0, qq, {n_layers, n_layers});
  check_state("qsum", 0, qsum, {n_layers});
  critlayers::feature_moments_accumulate(kernels, feats, shifts, pair_a, pair_b, cross, va, vb,
                                         colsum, qq, qsum, chunk_rows);
}

}  // namespace ops

TORCH_LIBRARY(critlayers, m) {
  m.def(
      "gram_hsic(Tensor[] feats, str kernel, float[] gammas, bool unbiased, int tile) "
      "-> Tensor");
  m.def(
      "gram_hsic_accumulate(Tensor(a!) out, Tensor[] feats, str kernel, float[] gammas, "
      "bool unbiased, int tile, float alpha) -> ()");
  m.def("gram_pair_hsic(Tensor grams_x, Tensor grams_y, bool unbiased, int block_rows) -> Tensor");
  m.def("center_gram(Tensor gram, bool unbiased) -> Tensor");
  m.def(
      "feature_moments_accumulate(Tensor[] feats, Tensor[] shifts, int[] pair_a, int[] pair_b, "
      "Tensor(a!)[] cross, Tensor(b!)[] va, Tensor(c!)[] vb, Tensor(d!)[] colsum, "
      "Tensor(e!) qq, Tensor(f!) qsum, int chunk_rows) -> ()");
}

}  // namespace critlayers

// The Python module exists only in the Python build; C++ users of the CMake library load the
// ops with torch::ops / torch.ops.load_library and need no Python.
#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "critlayers CKA engine: importing this module registers the torch.ops.critlayers ops";
  m.def(
      "built_with_cuda",
      []() {
#ifdef CRITLAYERS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA half of the engine was compiled into this module.");
  m.def("cpu_product_backend", &critlayers::cpu_product_backend, pybind11::arg("width"),
        "Where the CPU half's float32 Gram products of rows of `width` features run: 'onednn' "
        "or 'blas' (torch's BLAS).");
  m.def("set_cpu_product_backend", &critlayers::set_cpu_product_backend, pybind11::arg("name"),
        "Rule for the CPU half's float32 Gram products: 'auto' (default; the environment "
        "variable CRITLAYERS_CPU_GEMM sets it at start-up), 'blas' or 'onednn'.");
  m.def("cpu_has_onednn", &critlayers::cpu_has_onednn,
        "Whether torch has the oneDNN linear op that the CPU half can use.");
  m.def("_use_generic_cpu_kernels", &critlayers::use_generic_cpu_kernels, pybind11::arg("generic"),
        "Testing aid: run CPU ops without the CPU-only fast paths, as the CUDA half runs them.");
}
#endif  // TORCH_EXTENSION_NAME
