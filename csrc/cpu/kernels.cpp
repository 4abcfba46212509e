// CPU half of the CKA engine: the kernels of engine.h and the op registrations for CPU
// tensors. Gram products run in oneDNN or MKL through torch's ops; the loops here are
// parallelised with at::parallel_for, or run inline when the engine already spreads layers
// over threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../cka_math.h"
#include "../engine.h"
#include "../ops.h"

namespace critlayers {
namespace {

using at::Tensor;

// The mkldnn::_linear_pointwise op (X W^T in oneDNN) that torch registers when it is built with
// oneDNN, when present with the argument types product_nt_cpu passes:
// (Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor.
// Any other torch gets std::nullopt, and the products go to at::mm_out.
std::optional<c10::OperatorHandle> find_onednn_linear() {
  auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
  if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    return std::nullopt;
  }
  const auto& schema = op->schema();
  const std::vector<std::string> expected{"Tensor", "Tensor",    "Tensor?",
                                          "str",    "Scalar?[]", "str?"};
  if (schema.arguments().size() != expected.size() || schema.returns().size() != 1) {
    return std::nullopt;
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (schema.arguments()[i].type()->str() != expected[i]) {
      return std::nullopt;
    }
  }
  return op;
}

const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op = find_onednn_linear();
  return op;
}

// Where float32 Gram products go: torch's BLAS (at::mm_out, MKL in torch's x86 builds) or
// oneDNN. On the Intel Xeon of BENCHMARKS.md, on the engine's bands of about 128 rows, MKL ran
// faster for rows of up to about a thousand features and oneDNN for longer rows (d >= 2048:
// 10-25 % faster). MKL does not take its fastest paths on other vendors' CPUs; on an AMD EPYC,
// oneDNN ran these products 10-20 % faster than MKL at both d = 640 and d = 4096.
constexpr int64_t kOnednnMinWidthOnIntel = 2048;

bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// The policy: "auto" (the rule above), "blas" or "onednn"; CRITLAYERS_CPU_GEMM sets the
// initial value, set_cpu_product_backend() changes it.
std::atomic<int> product_policy{-1};
constexpr int kPolicyAuto = 0;
constexpr int kPolicyBlas = 1;
constexpr int kPolicyOnednn = 2;

int parse_policy(const std::string& name, const char* origin) {
  if (name == "auto") {
    return kPolicyAuto;
  }
  if (name == "blas") {
    return kPolicyBlas;
  }
  if (name == "onednn") {
    TORCH_CHECK_VALUE(onednn_linear().has_value(), origin,
                      ": 'onednn' needs a torch built with oneDNN (mkldnn), which this one is not");
    return kPolicyOnednn;
  }
  TORCH_CHECK_VALUE(false, origin, " must be 'auto', 'blas' or 'onednn', got '", name, "'");
  return kPolicyAuto;
}

int policy() {
  int value = product_policy.load();
  if (value < 0) {
    const char* env = std::getenv("CRITLAYERS_CPU_GEMM");
    value = env == nullptr || *env == '\0'
                ? kPolicyAuto
                : parse_policy(env, "the environment variable CRITLAYERS_CPU_GEMM");
    product_policy.store(value);
  }
  return value;
}

bool products_in_onednn(int64_t width) {
  if (!onednn_linear()) {
    return false;
  }
  switch (policy()) {
    case kPolicyBlas:
      return false;
    case kPolicyOnednn:
      return true;
    default:
      return !intel_cpu() || width >= kOnednnMinWidthOnIntel;
  }
}

// product_nt: float32 products of rows with unit stride go to oneDNN where the rule above picks
// it (its op returns a new tensor, copied into out); everything else goes to at::mm_out, which
// writes out in place. Both follow torch's float32 matmul precision setting.
void product_nt_cpu(const Tensor& a, const Tensor& b, Tensor& out) {
  if (a.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() && a.size(1) > 0 &&
      products_in_onednn(a.size(1))) {
    torch::jit::Stack stack;
    torch::jit::push(stack, a, b, c10::IValue(), std::string("none"),
                     c10::List<std::optional<at::Scalar>>(), c10::IValue());
    onednn_linear()->callBoxed(&stack);
    out.copy_(stack.at(0).toTensor());
    return;
  }
  generic_product_nt(a, b, out);
}

// column_moments: sums[c] = sum_r (x[r, c] - x[0, c]), sum_squares[c] = sum_r (...)^2,
// float64. Each task owns a range of columns and walks every row over it, so a row-major x is
// read in contiguous segments and no partial sums need merging; the unit-stride loop
// vectorises.
template <typename scalar_t>
void column_moments_loop(const Tensor& x, Tensor& sums, Tensor& sum_squares) {
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  double* sums_data = sums.data_ptr<double>();
  double* squares_data = sum_squares.data_ptr<double>();
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const int64_t x_row_stride = x.stride(0);
  const int64_t x_col_stride = x.stride(1);
  at::parallel_for(0, d, 256, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> first(width);
    std::vector<double> s1(width, 0.0);
    std::vector<double> s2(width, 0.0);
    for (int64_t c = 0; c < width; ++c) {
      first[c] = static_cast<double>(x_data[(begin + c) * x_col_stride]);
    }
    const double* f = first.data();
    double* a = s1.data();
    double* b = s2.data();
    for (int64_t r = 1; r < n; ++r) {
      const scalar_t* row = x_data + r * x_row_stride + begin * x_col_stride;
      if (x_col_stride == 1) {
        for (int64_t c = 0; c < width; ++c) {
          const double v = static_cast<double>(row[c]) - f[c];
          a[c] += v;
          b[c] += v * v;
        }
      } else {
        for (int64_t c = 0; c < width; ++c) {
          const double v = static_cast<double>(row[c * x_col_stride]) - f[c];
          a[c] += v;
          b[c] += v * v;
        }
      }
    }
    std::copy(s1.begin(), s1.end(), sums_data + begin);
    std::copy(s2.begin(), s2.end(), squares_data + begin);
  });
}

void column_moments_cpu(const Tensor& x, Tensor& sums, Tensor& sum_squares) {
  TORCH_INTERNAL_ASSERT(sums.is_contiguous() && sum_squares.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_moments",
                                  [&] { column_moments_loop<scalar_t>(x, sums, sum_squares); });
}

// One feature of centre_rows. A float64 shift follows cka_math.h: (x - shift) * inv_scale in
// float64, rounded to acc_t. A float32 shift of float32 rows (unscaled) subtracts in float32,
// which rounds the exact difference once; the float64 form rounds it twice (to float64, then to
// float32), the same value except in rare ties, at twice the vector width.
template <typename acc_t, typename scalar_t, typename shift_t>
inline acc_t shifted_feature(scalar_t x, shift_t shift, double inv_scale) {
  if constexpr (std::is_same_v<shift_t, float>) {
    return x - shift;
  } else {
    return math::centred_feature<acc_t>(x, shift, inv_scale);
  }
}

// One unit-stride row of centre_rows: dst = the shifted features of src, and the squared norm of
// dst returned. The pointers do not alias, so the loop vectorises; the squares go to eight
// independent float64 lanes.
template <typename scalar_t, typename acc_t, typename shift_t>
double centre_row(const scalar_t* __restrict__ src, const shift_t* __restrict__ shift,
                  double inv_scale, acc_t* __restrict__ dst, int64_t d) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t v = shifted_feature<acc_t>(src[c + k], shift[c + k], inv_scale);
      dst[c + k] = v;
      lanes[k] += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  for (; c < d; ++c) {
    const acc_t v = shifted_feature<acc_t>(src[c], shift[c], inv_scale);
    dst[c] = v;
    lanes[0] += static_cast<double>(v) * static_cast<double>(v);
  }
  double total = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) {
    total += lanes[k];
  }
  return total;
}

// centre_rows: out[r, c] = (x[row0 + r, c] - shift[c]) * inv_scale, sq_norms[r] = sum_c out^2.
// Each task owns a contiguous range of rows; the stored value in acc_t, squares in float64.
template <typename scalar_t, typename acc_t, typename shift_t>
void centre_rows_loop(const Tensor& x, int64_t row0, int64_t rows, const shift_t* shift,
                      double inv_scale, Tensor& out, Tensor& sq_norms) {
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  acc_t* out_data = out.data_ptr<acc_t>();
  double* sq_data = sq_norms.data_ptr<double>();
  const int64_t sq_stride = sq_norms.stride(0);
  const int64_t d = x.size(1);
  const int64_t x_row_stride = x.stride(0);
  const int64_t x_col_stride = x.stride(1);
  const int64_t out_row_stride = out.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x_data + (row0 + r) * x_row_stride;
      acc_t* dst = out_data + r * out_row_stride;
      double total = 0.0;
      if (x_col_stride == 1) {
        total = centre_row(src, shift, inv_scale, dst, d);
      } else {
        for (int64_t c = 0; c < d; ++c) {
          const acc_t v = shifted_feature<acc_t>(src[c * x_col_stride], shift[c], inv_scale);
          dst[c] = v;
          total += static_cast<double>(v) * static_cast<double>(v);
        }
      }
      sq_data[r * sq_stride] = total;
    }
  });
}

// The float32 copy of mean when every value is a float32 number (a shift by a float32 row);
// otherwise empty.
std::vector<float> float32_shift(const Tensor& mean) {
  const double* m = mean.data_ptr<double>();
  std::vector<float> shift(mean.numel());
  for (int64_t c = 0; c < mean.numel(); ++c) {
    shift[c] = static_cast<float>(m[c]);
    if (static_cast<double>(shift[c]) != m[c]) {
      return {};
    }
  }
  return shift;
}

void centre_rows_cpu(const Tensor& x, int64_t row0, int64_t rows, const Tensor& mean,
                     double inv_scale, Tensor& out, Tensor& sq_norms) {
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && mean.is_contiguous());
  if (x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && inv_scale == 1.0) {
    const std::vector<float> shift = float32_shift(mean);
    if (static_cast<int64_t>(shift.size()) == mean.numel()) {
      centre_rows_loop<float, float>(x, row0, rows, shift.data(), inv_scale, out, sq_norms);
      return;
    }
  }
  const double* shift = mean.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centre_rows", [&] {
    if (out.scalar_type() == at::kDouble) {
      centre_rows_loop<scalar_t, double>(x, row0, rows, shift, inv_scale, out, sq_norms);
    } else {
      centre_rows_loop<scalar_t, float>(x, row0, rows, shift, inv_scale, out, sq_norms);
    }
  });
}

// centre_tile: out64[r, c] = centred kernel value of Gram entry (r, c) of one tile, formed in
// float64 and stored as out_t (float64, or the Gram's type for a compact store).
// Linear: K = gram; RBF: K = exp(-gamma * |x_r - x_c|^2) from the dot products and the
// squared norms. Then K - u_r - u_c, and 0 on the full Gram's diagonal for the unbiased
// estimator (entry (r, c) lies on it when c - r == diagonal_shift). Each task owns rows;
// distances and exponentials in the tile's type, the centred value in float64.
template <typename scalar_t, typename out_t>
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
  out_t* out = out64.data_ptr<out_t>();
  const int64_t out_row_stride = out64.stride(0);
  const acc_t gamma_acc = static_cast<acc_t>(gamma);
  at::parallel_for(0, ti, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g_row = g + r * g_row_stride;
      out_t* out_row = out + r * out_row_stride;
      const double u_r = u_rows[r];
      const int64_t diag_col = r + diagonal_shift;
      if (rbf) {
        const acc_t q_r = static_cast<acc_t>(q_rows[r]);
        for (int64_t c = 0; c < tj; ++c) {
          const acc_t d2 =
              c == diag_col ? acc_t(0)
                            : math::sq_distance<acc_t>(q_r, static_cast<acc_t>(q_cols[c]),
                                                       static_cast<acc_t>(g_row[c * g_col_stride]));
          out_row[c] = static_cast<out_t>(math::centred_entry<acc_t>(
              math::rbf_value<acc_t>(d2, gamma_acc), u_r, u_cols[c], c == diag_col, unbiased));
        }
      } else if (g_col_stride == 1) {
        for (int64_t c = 0; c < tj; ++c) {
          out_row[c] = static_cast<out_t>(math::centred_entry<acc_t>(static_cast<acc_t>(g_row[c]),
                                                                     u_r, u_cols[c], false, false));
        }
      } else {
        for (int64_t c = 0; c < tj; ++c) {
          out_row[c] = static_cast<out_t>(math::centred_entry<acc_t>(
              static_cast<acc_t>(g_row[c * g_col_stride]), u_r, u_cols[c], false, false));
        }
      }
      if (!rbf && unbiased && diag_col >= 0 && diag_col < tj) {
        out_row[diag_col] =
            static_cast<out_t>(math::centred_entry<acc_t>(acc_t(0), u_r, u_r, true, true));
      }
    }
  });
}

void centre_tile_cpu(const Tensor& gram, bool rbf, const Tensor& sq_rows, const Tensor& sq_cols,
                     double gamma, const Tensor& offsets_rows, const Tensor& offsets_cols,
                     int64_t diagonal_shift, bool unbiased, Tensor& out64) {
  TORCH_INTERNAL_ASSERT(out64.stride(1) == 1 && offsets_rows.is_contiguous() &&
                        offsets_cols.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gram.scalar_type(), "centre_tile", [&] {
    if (out64.scalar_type() == at::kDouble) {
      centre_tile_loop<scalar_t, double>(gram, rbf, sq_rows, sq_cols, gamma, offsets_rows,
                                         offsets_cols, diagonal_shift, unbiased, out64);
    } else {
      TORCH_INTERNAL_ASSERT(out64.scalar_type() == gram.scalar_type());
      centre_tile_loop<scalar_t, scalar_t>(gram, rbf, sq_rows, sq_cols, gamma, offsets_rows,
                                           offsets_cols, diagonal_shift, unbiased, out64);
    }
  });
}

// Adds the row sums of one block of a Gram (rows x cols, row stride g_row_stride) to
// row_sums, and with kColumns its column sums to col_sums; float64 sums over eight lanes.
template <bool kColumns, typename scalar_t>
void add_block_sums(const scalar_t* g, int64_t g_row_stride, int64_t rows, int64_t cols,
                    double* __restrict__ row_sums, double* __restrict__ col_sums) {
  constexpr int64_t kLanes = 8;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ g_row = g + r * g_row_stride;
    double lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const double v = static_cast<double>(g_row[c + k]);
        lanes[k] += v;
        if constexpr (kColumns) {
          col_sums[c + k] += v;
        }
      }
    }
    double total = 0.0;
    for (; c < cols; ++c) {
      const double v = static_cast<double>(g_row[c]);
      total += v;
      if constexpr (kColumns) {
        col_sums[c] += v;
      }
    }
    for (int64_t k = 0; k < kLanes; ++k) {
      total += lanes[k];
    }
    row_sums[r] += total;
  }
}

// centre_blocks: first the row sums of the symmetric Gram from the blocks of its upper
// triangle (a diagonal block by rows; a block right of the diagonal by rows, and by columns for
// the mirrored lower triangle), and from them the offsets (cka_math.h); then each task owns
// whole blocks and writes them row by row, so the store is written once, sequentially. Each
// value is formed in float64 and rounded to the store's type, the Gram's.
template <typename scalar_t>
void centre_blocks_loop(const Tensor& gram, bool unbiased, const std::vector<Block>& blocks,
                        Tensor& store) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = gram.size(0);
  const double nd = static_cast<double>(n);
  const scalar_t* g = gram.data_ptr<scalar_t>();
  const int64_t row_stride = gram.stride(0);
  std::vector<double> offsets(n, 0.0);
  std::vector<double> col_sums;
  for (const Block& block : blocks) {
    const scalar_t* g_block = g + block.i0 * row_stride + block.j0;
    if (block.j0 == block.i0) {
      add_block_sums<false>(g_block, row_stride, block.ti, block.tj, offsets.data() + block.i0,
                            nullptr);
    } else {
      col_sums.assign(block.tj, 0.0);
      add_block_sums<true>(g_block, row_stride, block.ti, block.tj, offsets.data() + block.i0,
                           col_sums.data());
      for (int64_t c = 0; c < block.tj; ++c) {
        offsets[block.j0 + c] += col_sums[c];
      }
    }
  }
  // The U-centred Gram zeroes the diagonal: its row sums leave it out.
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (unbiased) {
      offsets[i] -= static_cast<double>(g[i * row_stride + i]);
    }
    total += offsets[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    offsets[i] = unbiased ? math::unbiased_offset(offsets[i], total, nd)
                          : math::biased_offset(offsets[i], total, nd);
  }
  const double* u = offsets.data();
  scalar_t* out = store.data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Block& block = blocks[b];
      for (int64_t r = 0; r < block.ti; ++r) {
        const int64_t row = block.i0 + r;
        const scalar_t* __restrict__ g_row = g + row * row_stride + block.j0;
        const double* __restrict__ u_cols = u + block.j0;
        scalar_t* __restrict__ out_row = out + block.offset + r * block.tj;
        const double u_r = u[row];
        for (int64_t c = 0; c < block.tj; ++c) {
          out_row[c] = static_cast<scalar_t>(math::centred_entry<acc_t>(
              static_cast<acc_t>(g_row[c]), u_r, u_cols[c], false, false));
        }
        const int64_t diag_col = row - block.j0;
        if (unbiased && diag_col >= 0 && diag_col < block.tj) {
          out_row[diag_col] =
              static_cast<scalar_t>(math::centred_entry<acc_t>(acc_t(0), u_r, u_r, true, true));
        }
      }
    }
  });
}

void centre_blocks_cpu(const Tensor& gram, bool unbiased, const std::vector<Block>& blocks,
                       Tensor& store) {
  TORCH_INTERNAL_ASSERT(gram.stride(1) == 1 && gram.size(1) == gram.size(0) &&
                        store.is_contiguous() && store.scalar_type() == gram.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "centre_blocks",
                             [&] { centre_blocks_loop<scalar_t>(gram, unbiased, blocks, store); });
}

// store_products: acc += weight * S S^T for S (m, k) float32 or float64, m small (layers) and
// k large (Gram entries), a shape on which BLAS runs far below its peak (MKL: ~45 ns per
// column at m = 18, where the arithmetic needs ~6). A register-blocked kernel instead: the
// columns are taken in chunks that stay in the L2 cache, and per chunk each block of
// kBlock x kBlock pairs of rows keeps its kBlock^2 sums in vector registers of kWidth float64
// lanes, loading 2 kBlock vectors for kBlock^2 multiply-adds. float32 entries are widened to
// float64 as they are loaded, so every product is exact and every sum float64.
#if defined(__AVX512F__)
constexpr int64_t kWidth = 8;  // one 512-bit register of float64
constexpr int64_t kBlock = 4;  // 16 accumulators + 8 operands of the 32 registers
#else
constexpr int64_t kWidth = 4;  // one 256-bit register (two 128-bit ones without AVX)
constexpr int64_t kBlock = 3;  // 9 accumulators + 6 operands of the 16 registers
#endif
typedef double LanesF64 __attribute__((vector_size(kWidth * sizeof(double))));
typedef float LanesF32 __attribute__((vector_size(kWidth * sizeof(float))));

inline LanesF64 load_lanes(const double* p) {
  LanesF64 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline LanesF64 load_lanes(const float* p) {
#if defined(__AVX512F__)
  // One conversion instruction; the generic form below compiles to four when the compiler
  // prefers 256-bit vectors.
  // (The zero-masked form: GCC 12 warns on the undefined pass-through of _mm512_cvtps_pd.)
  return reinterpret_cast<LanesF64>(
      _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_loadu_ps(p)));
#else
  LanesF32 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, LanesF64);
#endif
}

// sums[i * kBlock + j] += sum_{c < width} a[i][c] * b[j][c].
template <typename store_t>
void block_products(const store_t* const* a, const store_t* const* b, int64_t width, double* sums) {
  LanesF64 acc[kBlock][kBlock] = {};
  const int64_t body = width - width % kWidth;
  for (int64_t c = 0; c < body; c += kWidth) {
    LanesF64 va[kBlock];
    LanesF64 vb[kBlock];
    for (int64_t i = 0; i < kBlock; ++i) {
      va[i] = load_lanes(a[i] + c);
      vb[i] = load_lanes(b[i] + c);
    }
    for (int64_t i = 0; i < kBlock; ++i) {
      for (int64_t j = 0; j < kBlock; ++j) {
        acc[i][j] += va[i] * vb[j];
      }
    }
  }
  for (int64_t i = 0; i < kBlock; ++i) {
    for (int64_t j = 0; j < kBlock; ++j) {
      double total = 0.0;
      for (int64_t l = 0; l < kWidth; ++l) {
        total += acc[i][j][l];
      }
      for (int64_t c = body; c < width; ++c) {
        total += static_cast<double>(a[i][c]) * static_cast<double>(b[j][c]);
      }
      sums[i * kBlock + j] += total;
    }
  }
}

template <typename store_t>
void store_products_loop(const Tensor& stores, double weight, Tensor& acc) {
  const int64_t m = stores.size(0);
  const int64_t k = stores.size(1);
  const int64_t row_stride = stores.stride(0);
  const store_t* s = stores.data_ptr<store_t>();
  const int64_t n_blocks = (m + kBlock - 1) / kBlock;
  const int64_t m_pad = n_blocks * kBlock;
  // Rows past m repeat the last row; their sums are computed and dropped.
  std::vector<const store_t*> rows(m_pad);
  for (int64_t r = 0; r < m_pad; ++r) {
    rows[r] = s + std::min(r, m - 1) * row_stride;
  }
  // Chunks of about 256 KiB of all rows, a whole number of vectors wide.
  const int64_t chunk = std::max<int64_t>(
      kWidth * 16,
      (int64_t{256} << 10) / (m_pad * static_cast<int64_t>(sizeof(store_t))) / kWidth * kWidth);
  const int64_t n_chunks = (k + chunk - 1) / chunk;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  std::vector<double> partial(n_tasks * m_pad * m_pad, 0.0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<double> block_sums(kBlock * kBlock);
    std::vector<const store_t*> a(kBlock);
    std::vector<const store_t*> b(kBlock);
    for (int64_t task = task_begin; task < task_end; ++task) {
      double* part = partial.data() + task * m_pad * m_pad;
      const int64_t c_begin = std::min(k, chunk * (n_chunks * task / n_tasks));
      const int64_t c_end = std::min(k, chunk * (n_chunks * (task + 1) / n_tasks));
      for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
        const int64_t width = std::min(chunk, c_end - c0);
        for (int64_t ba = 0; ba < n_blocks; ++ba) {
          for (int64_t bb = ba; bb < n_blocks; ++bb) {
            for (int64_t i = 0; i < kBlock; ++i) {
              a[i] = rows[ba * kBlock + i] + c0;
              b[i] = rows[bb * kBlock + i] + c0;
            }
            std::fill(block_sums.begin(), block_sums.end(), 0.0);
            block_products(a.data(), b.data(), width, block_sums.data());
            for (int64_t i = 0; i < kBlock; ++i) {
              for (int64_t j = 0; j < kBlock; ++j) {
                part[(ba * kBlock + i) * m_pad + bb * kBlock + j] += block_sums[i * kBlock + j];
              }
            }
          }
        }
      }
    }
  });
  // Entry (a, b) with a <= b comes from the block pair (a / kBlock, b / kBlock), which the
  // loops above visit because a / kBlock <= b / kBlock.
  double* out = acc.data_ptr<double>();
  for (int64_t ra = 0; ra < m; ++ra) {
    for (int64_t rb = ra; rb < m; ++rb) {
      double total = 0.0;
      for (int64_t task = 0; task < n_tasks; ++task) {
        total += partial[task * m_pad * m_pad + ra * m_pad + rb];
      }
      out[ra * m + rb] += weight * total;
      if (rb != ra) {
        out[rb * m + ra] += weight * total;
      }
    }
  }
}

void store_products_cpu(const Tensor& stores, double weight, Tensor& acc) {
  TORCH_INTERNAL_ASSERT(stores.stride(1) == 1 && acc.is_contiguous() &&
                        acc.scalar_type() == at::kDouble);
  if (stores.scalar_type() == at::kFloat) {
    store_products_loop<float>(stores, weight, acc);
  } else {
    TORCH_INTERNAL_ASSERT(stores.scalar_type() == at::kDouble);
    store_products_loop<double>(stores, weight, acc);
  }
}

}  // namespace

namespace {
std::atomic<bool> generic_cpu_kernels{false};
}  // namespace

void use_generic_cpu_kernels(bool generic) { generic_cpu_kernels = generic; }

const char* cpu_product_backend(int64_t width) {
  return products_in_onednn(width) ? "onednn" : "blas";
}

void set_cpu_product_backend(const std::string& name) {
  product_policy.store(parse_policy(name, "set_cpu_product_backend: backend"));
}

bool cpu_has_onednn() { return onednn_linear().has_value(); }

const Kernels& cpu_kernels() {
  static const Kernels kernels{&product_nt_cpu,        &column_moments_cpu, &centre_rows_cpu,
                               &centre_tile_cpu,       &centre_blocks_cpu,  &store_products_cpu,
                               /*compact_stores=*/true};
  // Without the CPU-only fast paths, composed as the CUDA half runs.
  static const Kernels generic{
      &generic_product_nt,     &column_moments_cpu,     &centre_rows_cpu, &centre_tile_cpu, nullptr,
      &generic_store_products, /*compact_stores=*/false};
  return generic_cpu_kernels ? generic : kernels;
}

TORCH_LIBRARY_IMPL(critlayers, CPU, m) { register_backend_ops<&cpu_kernels>(m); }

}  // namespace critlayers
