// Device-agnostic drivers of the CKA engine. Gram products and every element-wise step go to
// the backend's kernels (engine.h), which share their arithmetic through cka_math.h; the other
// matrix products go to ATen (MKL on the CPU, cuBLAS on CUDA). Each phase shows in torch.profiler
// as a critlayers:: record.
#include "engine.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>

#include "cka_math.h"

namespace critlayers {
namespace {

using at::Tensor;

at::ScalarType compute_type(at::TensorList feats) {
  for (const auto& x : feats) {
    if (x.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// Largest store of the centred Gram blocks of all layers for the whole-layer schedule.
constexpr int64_t kWholeLayerBytes = int64_t{64} << 20;
// Rows of one band of the whole-layer schedule, before bands are evened out. Narrower bands
// skip more of the lower triangle; wider ones keep the products efficient.
constexpr int64_t kBandRows = 128;
// Squared row norms outside this range are rescaled before float32 products are formed.
constexpr double kLargestSafeSquare = 1e30;
constexpr double kSmallestSafeSquare = 1e-30;

// Rows per chunk for float64 passes over a feature matrix: about 8 MiB at a time.
int64_t stats_chunk(int64_t d) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(d, 1));
}

// A view of the first numel elements of a flat buffer as a (rows, cols) matrix.
Tensor view2d(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Applies an offset rule that is affine in the row sum (cka_math.h) to a whole vector.
template <typename Rule>
Tensor affine_offsets(const Tensor& row_sums, double total, double n, Rule rule) {
  const double slope = rule(1.0, 0.0, n) - rule(0.0, 0.0, n);
  const double intercept = rule(0.0, total, n);
  return row_sums * slope + intercept;
}

// The blocks that cover the upper triangle of an n x n Gram, diagonal blocks first.
struct BlockPlan {
  std::vector<Block> blocks;
  int64_t n_diagonal = 0;     // blocks[0, n_diagonal) lie on the diagonal
  int64_t diagonal_area = 0;  // their total number of entries
  int64_t area = 0;           // entries of all blocks
};

// Band height of the whole-layer schedule: at most kBandRows and `tile`, split evenly so that
// the last band is not a sliver.
int64_t whole_layer_band(int64_t n, int64_t tile) {
  const int64_t target = std::min(kBandRows, tile);
  const int64_t n_bands = std::max<int64_t>(1, (n + target - 1) / target);
  return (n + n_bands - 1) / n_bands;
}

// Bands of `band` rows: each contributes its square diagonal block and the rectangle right of
// it, so one product per band forms the whole upper triangle.
BlockPlan band_plan(int64_t n, int64_t band) {
  BlockPlan plan;
  for (int64_t i0 = 0; i0 < n; i0 += band) {
    const int64_t rows = std::min(band, n - i0);
    plan.blocks.push_back({i0, rows, i0, rows, plan.area});
    plan.area += rows * rows;
  }
  plan.n_diagonal = static_cast<int64_t>(plan.blocks.size());
  plan.diagonal_area = plan.area;
  for (int64_t i0 = 0; i0 < n; i0 += band) {
    const int64_t rows = std::min(band, n - i0);
    const int64_t cols = n - i0 - rows;
    if (cols > 0) {
      plan.blocks.push_back({i0, rows, i0 + rows, cols, plan.area});
      plan.area += rows * cols;
    }
  }
  return plan;
}

struct LayerPrep {
  Tensor mean;              // (d,) float64
  Tensor sq_norms;          // (n,) float64, of the centred and scaled rows
  Tensor offsets;           // (n,) float64, centring offsets (cka_math.h)
  double gamma = 0;         // RBF: 1 / (2 sigma^2) in scaled units
  double offset_slope = 0;  // linear, unbiased: offsets = slope * sq_norms + intercept
  double offset_intercept = 0;
};

}  // namespace

void generic_column_moments(const at::Tensor& x, at::Tensor& sums, at::Tensor& sum_squares) {
  const int64_t n = x.size(0);
  const int64_t chunk = stats_chunk(x.size(1));
  const Tensor first = x[0].to(at::kDouble);
  sums.zero_();
  sum_squares.zero_();
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    // A new tensor: for float64 input, to() returns x itself, which must not be modified.
    Tensor shifted = x.narrow(0, r0, std::min(chunk, n - r0)).to(at::kDouble) - first;
    sums.add_(shifted.sum(0));
    sum_squares.add_(shifted.square_().sum(0));
  }
}

void generic_product_nt(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  at::mm_out(out, a, b.t());
}

void generic_store_products(const at::Tensor& stores, double weight, at::Tensor& acc) {
  acc.addmm_(stores, stores.t(), 1.0, weight);
}

// Tile buffers. On the CPU they are kept per thread between calls, so that large tiles are not
// page-faulted in again on every call (the kernel zeroes fresh pages, which costs about as much
// as centring them); CUDA tensors already come from torch's caching allocator.
Tensor workspace(size_t slot, int64_t numel, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu()) {
    return at::empty({numel}, opts);
  }
  static thread_local std::array<Tensor, 4> cache;
  Tensor& buf = cache.at(slot);
  if (!buf.defined() || buf.numel() < numel || buf.scalar_type() != opts.dtype()) {
    buf = Tensor();
    buf = at::empty({numel}, opts);
  }
  return buf.narrow(0, 0, numel);
}

void gram_hsic_accumulate(const Kernels& kernels, const Tensor& out, at::TensorList feats,
                          const std::string& kernel, at::ArrayRef<double> gammas, bool unbiased,
                          int64_t tile, double alpha) {
  const int64_t n_layers = static_cast<int64_t>(feats.size());
  const int64_t n = feats[0].size(0);
  const double nd = static_cast<double>(n);
  const bool rbf = kernel == "rbf";
  const auto cdt = compute_type(feats);
  const auto opts = feats[0].options().dtype(cdt);
  const auto opts64 = feats[0].options().dtype(at::kDouble);
  int64_t d_max = 0;
  int64_t width_total = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    d_max = std::max(d_max, feats[l].size(1));
    width_total += feats[l].size(1);
  }

  // On the CPU, layers are spread over threads when there are at least as many layers as
  // threads, each matrix product then running on one thread; otherwise (few layers, or CUDA)
  // layers go in order and each product uses every thread.
  const int64_t n_threads = at::get_num_threads();
  const bool layer_parallel = feats[0].device().is_cpu() && n_threads > 1 && n_layers >= n_threads;
  const int64_t n_workers = layer_parallel ? n_threads : 1;
  // Workers take the next layer as they finish one, so a core slowed by other work (a shared
  // machine) does not hold up the others.
  auto for_each_layer = [&](auto&& body) {
    if (layer_parallel) {
      std::atomic<int64_t> next_layer{0};
      at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
        const int64_t worker = at::get_thread_num();
        for (int64_t l = next_layer++; l < n_layers; l = next_layer++) {
          body(l, worker);
        }
      });
    } else {
      for (int64_t l = 0; l < n_layers; ++l) {
        body(l, 0);
      }
    }
  };
  auto check_finite = [](int64_t l, bool finite) {
    TORCH_CHECK_VALUE(finite, "feats[", l, "] (layer ", l, ") contains NaN or Inf");
  };

  Tensor acc = at::zeros({n_layers, n_layers}, opts64);
  // Each layer's features are divided by scales[l] before their products are formed.
  std::vector<double> scales(n_layers, 1.0);
  // Adds the HSIC sums of the stored blocks (n_layers, area) to acc: diagonal blocks count
  // once, the others also stand for their transposes.
  auto add_block_products = [&](const Tensor& stored, const BlockPlan& plan) {
    RECORD_FUNCTION("critlayers::hsic_products", std::vector<c10::IValue>());
    kernels.store_products(stored.narrow(1, 0, plan.diagonal_area), 1.0, acc);
    if (plan.area > plan.diagonal_area) {
      kernels.store_products(stored.narrow(1, plan.diagonal_area, plan.area - plan.diagonal_area),
                             2.0, acc);
    }
  };
  // Adds this call's sums to out, undoing the per-layer scaling of the linear kernel (a linear
  // Gram scales with the square of the features).
  auto finish = [&]() {
    if (!rbf) {
      std::vector<double> sq_scales(n_layers);
      for (int64_t l = 0; l < n_layers; ++l) {
        sq_scales[l] = scales[l] * scales[l];
      }
      Tensor s = at::tensor(sq_scales, at::TensorOptions().dtype(at::kDouble)).to(out.device());
      acc.mul_(at::outer(s, s));
    }
    out.add_(acc, alpha);
  };

  // Whole-layer schedule: the linear kernel, while the centred upper triangles of all layers
  // fit in kWholeLayerBytes. Each layer is read once: its rows are shifted by its first row
  // (centred Grams do not change under a shift, and the shift takes a large shared offset out
  // of the float32 products). The upper triangle of the Gram is then formed band by band: one
  // product per band of rows covers the band's diagonal block and everything right of it. The
  // row sums of the whole symmetric Gram follow from these blocks (a diagonal block's rows, and
  // a block right of it by rows and by columns), and from them the centring offsets
  // (cka_math.h). Each block is then centred into a store (engine.h: compact_stores); the HSIC
  // of all pairs comes from two float64-accumulated products over the stores.
  const auto store_type = kernels.compact_stores ? cdt : at::kDouble;
  const BlockPlan bands = band_plan(n, whole_layer_band(n, tile));
  if (!rbf && n_layers * bands.area * static_cast<int64_t>(c10::elementSize(store_type)) <=
                  kWholeLayerBytes) {
    Tensor rows_buf = workspace(1, n_workers * n * d_max, opts);
    Tensor gram_buf = workspace(2, n_workers * n * n, opts);
    Tensor stored =
        workspace(3, n_layers * bands.area, opts64.dtype(store_type)).view({n_layers, bands.area});
    std::vector<char> finite(n_layers, 1);
    for_each_layer([&](int64_t l, int64_t worker) {
      const Tensor& feat = feats[l];
      const int64_t d = feat.size(1);
      Tensor x = view2d(rows_buf.narrow(0, worker * n * d_max, n * d_max), n, d);
      Tensor sq_norms = at::empty({n}, opts64);
      Tensor shift = feat[0].to(at::kDouble).contiguous();
      {
        RECORD_FUNCTION("critlayers::shift_rows", std::vector<c10::IValue>());
        kernels.centre_rows(feat, 0, n, shift, 1.0, x, sq_norms);
      }
      const double largest = sq_norms.max().item<double>();
      if (!std::isfinite(largest)) {
        finite[l] = 0;
        return;
      }
      if (cdt != at::kDouble && largest > 0 &&
          (largest > kLargestSafeSquare || largest < kSmallestSafeSquare)) {
        // Rows far from unit norm: scaled to unit largest norm, so that float32 products
        // neither overflow nor lose digits to subnormals.
        scales[l] = std::sqrt(largest);
        kernels.centre_rows(feat, 0, n, shift, 1.0 / scales[l], x, sq_norms);
      }
      Tensor gram = view2d(gram_buf.narrow(0, worker * n * n, n * n), n, n);
      {
        RECORD_FUNCTION("critlayers::gram_bands", std::vector<c10::IValue>());
        for (int64_t b = 0; b < bands.n_diagonal; ++b) {
          const int64_t i0 = bands.blocks[b].i0;
          const int64_t band_rows = bands.blocks[b].ti;
          Tensor band = gram.narrow(0, i0, band_rows).narrow(1, i0, n - i0);
          kernels.product_nt(x.narrow(0, i0, band_rows), x.narrow(0, i0, n - i0), band);
        }
      }
      RECORD_FUNCTION("critlayers::centre_blocks", std::vector<c10::IValue>());
      Tensor store = stored[l];
      if (kernels.centre_blocks != nullptr) {
        kernels.centre_blocks(gram, unbiased, bands.blocks, store);
        return;
      }
      Tensor row_sums = at::zeros({n}, opts64);
      for (const Block& b : bands.blocks) {
        const Tensor block = gram.narrow(0, b.i0, b.ti).narrow(1, b.j0, b.tj);
        row_sums.narrow(0, b.i0, b.ti).add_(block.sum(1, false, at::kDouble));
        if (b.j0 != b.i0) {
          row_sums.narrow(0, b.j0, b.tj).add_(block.sum(0, false, at::kDouble));
        }
      }
      Tensor offsets;
      if (unbiased) {
        // Row sums without the diagonal, which the U-centred Gram zeroes.
        const Tensor off_diagonal = row_sums - gram.diagonal().to(at::kDouble);
        offsets = affine_offsets(off_diagonal, off_diagonal.sum().item<double>(), nd,
                                 math::unbiased_offset);
      } else {
        offsets = affine_offsets(row_sums, row_sums.sum().item<double>(), nd, math::biased_offset);
      }
      const Tensor no_norms = at::empty({0}, opts64);
      for (const Block& b : bands.blocks) {
        Tensor values = view2d(store.narrow(0, b.offset, b.ti * b.tj), b.ti, b.tj);
        kernels.centre_tile(gram.narrow(0, b.i0, b.ti).narrow(1, b.j0, b.tj), false, no_norms,
                            no_norms, 0.0, offsets.narrow(0, b.i0, b.ti),
                            offsets.narrow(0, b.j0, b.tj), b.i0 - b.j0, unbiased, values);
      }
    });
    for (int64_t l = 0; l < n_layers; ++l) {
      check_finite(l, finite[l] != 0);
    }
    add_block_products(stored, bands);
    finish();
    return;
  }

  // Tile-outer schedule: memory O(n_layers * tile^2 + n_layers * tile * d). Per-layer
  // statistics come first, from one float64 pass over x; a NaN or Inf anywhere in a layer
  // shows up in these sums, so the check costs nothing extra.
  tile = std::min(tile, n);
  std::vector<LayerPrep> prep(n_layers);
  for (int64_t l = 0; l < n_layers; ++l) {
    RECORD_FUNCTION("critlayers::statistics", std::vector<c10::IValue>());
    const Tensor& x = feats[l];
    const int64_t d = x.size(1);
    LayerPrep& p = prep[l];
    Tensor sums = at::empty({d}, opts64);
    Tensor sum_squares = at::empty({d}, opts64);
    kernels.column_moments(x, sums, sum_squares);
    p.mean = x[0].to(at::kDouble) + sums / nd;  // out of place: x may already be float64
    // sum_i |x_i - mean|^2 from moments about the first row.
    const double total = (sum_squares - sums.square() / nd).sum().item<double>();
    check_finite(l, std::isfinite(total) && std::isfinite(p.mean.sum().item<double>()));
    const double mean_square = std::max(total, 0.0) / (nd * static_cast<double>(d));
    scales[l] = mean_square > 0 ? std::sqrt(mean_square) : 1.0;
    p.sq_norms = at::empty({n}, opts64);
    p.offsets = at::zeros({n}, opts64);
    if (rbf) {
      p.gamma = gammas[l] * scales[l] * scales[l];
    } else if (unbiased) {
      // Centred features have zero column sums, so the off-diagonal row sums of x x^T are
      // -|x_i|^2 and the U-centring offsets are affine in the row norms (set as rows are
      // centred, below).
      const double total_scaled = total / (scales[l] * scales[l]);
      p.offset_slope = math::unbiased_offset(0.0, 0.0, nd) - math::unbiased_offset(1.0, 0.0, nd);
      p.offset_intercept = math::unbiased_offset(0.0, -total_scaled, nd);
    }
  }
  const bool offsets_from_rows = !rbf && unbiased;

  // Centres rows [r0, r0 + rows) of layer l into out, recording their norms (and offsets).
  auto centre = [&](int64_t l, int64_t r0, int64_t rows, Tensor& out) {
    RECORD_FUNCTION("critlayers::centre_rows", std::vector<c10::IValue>());
    LayerPrep& p = prep[l];
    Tensor sq = p.sq_norms.narrow(0, r0, rows);
    kernels.centre_rows(feats[l], r0, rows, p.mean, 1.0 / scales[l], out, sq);
    if (offsets_from_rows) {
      p.offsets.narrow(0, r0, rows).copy_(sq).mul_(p.offset_slope).add_(p.offset_intercept);
    }
  };

  // The rows of one tile of every layer are kept centred (rows_i) while the tiles of its row
  // band are visited; the other tile's rows are centred per worker.
  Tensor gram_buf = workspace(2, n_workers * tile * tile, opts);
  Tensor rows_i_buf = workspace(0, tile * width_total, opts);
  std::vector<Tensor> rows_i(n_layers);
  for (int64_t l = 0, at_elem = 0; l < n_layers; ++l) {
    const int64_t d = feats[l].size(1);
    rows_i[l] = rows_i_buf.narrow(0, at_elem, tile * d).view({tile, d});
    at_elem += tile * d;
  }
  Tensor rows_j_buf = workspace(1, n_workers * tile * d_max, opts);
  Tensor centred =
      workspace(3, n_layers * tile * tile, opts64.dtype(store_type)).view({n_layers, tile * tile});

  // Visits the upper triangle of tiles (i0 <= j0). per_layer(l, i0, ti, j0, tj, gram_tile)
  // gets the dot products of the centred, scaled rows of layer l; after_layers(i0, ti, j0, tj)
  // runs once all layers of the tile are done.
  const int64_t n_tiles = (n + tile - 1) / tile;
  auto for_each_tile = [&](auto&& per_layer, auto&& after_layers) {
    for (int64_t bi = 0; bi < n_tiles; ++bi) {
      const int64_t i0 = bi * tile;
      const int64_t ti = std::min(tile, n - i0);
      for_each_layer([&](int64_t l, int64_t) {
        Tensor xi = rows_i[l].narrow(0, 0, ti);
        centre(l, i0, ti, xi);
      });
      for (int64_t bj = bi; bj < n_tiles; ++bj) {
        const int64_t j0 = bj * tile;
        const int64_t tj = std::min(tile, n - j0);
        for_each_layer([&](int64_t l, int64_t worker) {
          Tensor xi = rows_i[l].narrow(0, 0, ti);
          Tensor xj = xi;
          if (bj != bi) {
            xj = view2d(rows_j_buf.narrow(0, worker * tile * d_max, tile * d_max), tj,
                        feats[l].size(1));
            centre(l, j0, tj, xj);
          }
          Tensor g = view2d(gram_buf.narrow(0, worker * tile * tile, tile * tile), ti, tj);
          {
            RECORD_FUNCTION("critlayers::gram_tile", std::vector<c10::IValue>());
            kernels.product_nt(xi, xj, g);
          }
          per_layer(l, i0, ti, j0, tj, g);
        });
        after_layers(i0, ti, j0, tj);
      }
    }
  };
  if (rbf) {
    // The RBF Gram's row sums are not available from x alone: a first sweep over the tiles
    // accumulates them, and the second sweep recomputes each tile and centres it.
    std::vector<Tensor> row_sums(n_layers);
    for (int64_t l = 0; l < n_layers; ++l) {
      row_sums[l] = at::zeros({n}, opts64);
    }
    for_each_tile(
        [&](int64_t l, int64_t i0, int64_t ti, int64_t j0, int64_t tj, const Tensor& g) {
          Tensor values = view2d(centred[l], ti, tj);
          kernels.centre_tile(g, true, prep[l].sq_norms.narrow(0, i0, ti),
                              prep[l].sq_norms.narrow(0, j0, tj), prep[l].gamma,
                              prep[l].offsets.narrow(0, i0, ti), prep[l].offsets.narrow(0, j0, tj),
                              i0 - j0, false, values);
          row_sums[l].narrow(0, i0, ti).add_(values.sum(1, false, at::kDouble));
          if (j0 != i0) {
            row_sums[l].narrow(0, j0, tj).add_(values.sum(0, false, at::kDouble));
          }
        },
        [](int64_t, int64_t, int64_t, int64_t) {});
    for (int64_t l = 0; l < n_layers; ++l) {
      if (unbiased) {
        // The diagonal of an RBF Gram is exp(0) = 1.
        Tensor off_diag = row_sums[l] - 1.0;
        prep[l].offsets =
            affine_offsets(off_diag, off_diag.sum().item<double>(), nd, math::unbiased_offset);
      } else {
        prep[l].offsets =
            affine_offsets(row_sums[l], row_sums[l].sum().item<double>(), nd, math::biased_offset);
      }
    }
  }

  for_each_tile(
      [&](int64_t l, int64_t i0, int64_t ti, int64_t j0, int64_t tj, const Tensor& g) {
        RECORD_FUNCTION("critlayers::centre_tile", std::vector<c10::IValue>());
        Tensor values = view2d(centred[l], ti, tj);
        kernels.centre_tile(g, rbf, prep[l].sq_norms.narrow(0, i0, ti),
                            prep[l].sq_norms.narrow(0, j0, tj), prep[l].gamma,
                            prep[l].offsets.narrow(0, i0, ti), prep[l].offsets.narrow(0, j0, tj),
                            i0 - j0, unbiased, values);
      },
      [&](int64_t i0, int64_t ti, int64_t j0, int64_t tj) {
        // An off-diagonal tile stands for itself and its transpose.
        RECORD_FUNCTION("critlayers::hsic_products", std::vector<c10::IValue>());
        Tensor block = centred.narrow(1, 0, ti * tj);
        kernels.store_products(block, i0 == j0 ? 1.0 : 2.0, acc);
      });
  finish();
}

at::Tensor gram_pair_hsic(const Kernels& kernels, const at::Tensor& grams_x,
                          const at::Tensor& grams_y, bool unbiased, int64_t block_rows) {
  const int64_t n = grams_x.size(1);
  const double nd = static_cast<double>(n);
  const auto opts64 = grams_x.options().dtype(at::kDouble);
  Tensor empty_sq = at::empty({0}, opts64);

  // Row and column offsets of each Gram; rows and columns are kept apart so that the biased
  // path is exact for any square matrix.
  auto offsets = [&](const Tensor& grams) {
    std::vector<std::pair<Tensor, Tensor>> result;
    for (int64_t a = 0; a < grams.size(0); ++a) {
      Tensor k = grams[a].to(at::kDouble);
      Tensor rows = k.sum(1);
      Tensor cols = k.sum(0);
      if (unbiased) {
        Tensor diag = k.diagonal();
        rows = rows - diag;
        cols = cols - diag;
        const double total = rows.sum().item<double>();
        result.emplace_back(affine_offsets(rows, total, nd, math::unbiased_offset),
                            affine_offsets(cols, total, nd, math::unbiased_offset));
      } else {
        const double total = rows.sum().item<double>();
        result.emplace_back(affine_offsets(rows, total, nd, math::biased_offset),
                            affine_offsets(cols, total, nd, math::biased_offset));
      }
    }
    return result;
  };
  const auto off_x = offsets(grams_x);
  const auto off_y = offsets(grams_y);
  const int64_t nx = grams_x.size(0);
  const int64_t ny = grams_y.size(0);
  Tensor out = at::zeros({nx, ny}, opts64);
  Tensor bx = at::empty({nx, block_rows * n}, opts64);
  Tensor by = at::empty({ny, block_rows * n}, opts64);
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    auto fill = [&](const Tensor& grams, const auto& offs, Tensor& buf) {
      for (int64_t a = 0; a < grams.size(0); ++a) {
        Tensor dst = view2d(buf[a], rows, n);
        kernels.centre_tile(grams[a].narrow(0, r0, rows), false, empty_sq, empty_sq, 0.0,
                            offs[a].first.narrow(0, r0, rows), offs[a].second, r0, unbiased, dst);
      }
    };
    fill(grams_x, off_x, bx);
    fill(grams_y, off_y, by);
    out.addmm_(bx.narrow(1, 0, rows * n), by.narrow(1, 0, rows * n).t());
  }
  return out;
}

at::Tensor center_gram(const Kernels& kernels, const at::Tensor& gram, bool unbiased) {
  const int64_t n = gram.size(0);
  Tensor out = at::empty({n, n}, gram.options().dtype(at::kDouble));
  const double nd = static_cast<double>(n);
  Tensor k = gram.to(at::kDouble);
  Tensor rows = k.sum(1);
  Tensor cols = k.sum(0);
  Tensor row_off;
  Tensor col_off;
  if (unbiased) {
    Tensor diag = k.diagonal();
    rows = rows - diag;
    cols = cols - diag;
    const double total = rows.sum().item<double>();
    row_off = affine_offsets(rows, total, nd, math::unbiased_offset);
    col_off = affine_offsets(cols, total, nd, math::unbiased_offset);
  } else {
    const double total = rows.sum().item<double>();
    row_off = affine_offsets(rows, total, nd, math::biased_offset);
    col_off = affine_offsets(cols, total, nd, math::biased_offset);
  }
  Tensor empty_sq = at::empty({0}, out.options());
  kernels.centre_tile(gram, false, empty_sq, empty_sq, 0.0, row_off, col_off, 0, unbiased, out);
  return out;
}

void feature_moments_accumulate(const Kernels& kernels, at::TensorList feats, at::TensorList shifts,
                                at::IntArrayRef pair_a, at::IntArrayRef pair_b,
                                at::TensorList cross, at::TensorList va, at::TensorList vb,
                                at::TensorList colsum, const at::Tensor& qq, const at::Tensor& qsum,
                                int64_t chunk_rows) {
  const int64_t n_layers = static_cast<int64_t>(feats.size());
  const int64_t n = feats[0].size(0);
  const auto cdt = compute_type(feats);
  const auto opts = feats[0].options().dtype(cdt);
  std::vector<Tensor> centred(n_layers);
  std::vector<Tensor> sq(n_layers);
  for (int64_t r0 = 0; r0 < n; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - r0);
    Tensor q_all = at::empty({n_layers, rows}, qq.options());
    for (int64_t l = 0; l < n_layers; ++l) {
      centred[l] = at::empty({rows, feats[l].size(1)}, opts);
      Tensor q64 = q_all[l];
      kernels.centre_rows(feats[l], r0, rows, shifts[l], 1.0, centred[l], q64);
      sq[l] = q64.to(cdt);
      const double chunk_total = q64.sum().item<double>();
      TORCH_CHECK_VALUE(std::isfinite(chunk_total), "feats[", l, "] (layer ", l,
                        ") contains NaN or Inf");
      colsum[l].add_(centred[l].sum(0));
      qsum[l].add_(chunk_total);
    }
    qq.addmm_(q_all, q_all.t());
    for (size_t p = 0; p < pair_a.size(); ++p) {
      const Tensor& xa = centred[pair_a[p]];
      const Tensor& xb = centred[pair_b[p]];
      cross[p].add_(at::mm(xa.t(), xb));
      va[p].add_(at::mv(xa.t(), sq[pair_b[p]]));
      vb[p].add_(at::mv(xb.t(), sq[pair_a[p]]));
    }
  }
}

}  // namespace critlayers
