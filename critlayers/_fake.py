"""Shape functions of the engine's ops, so that they trace under torch.compile and FakeTensor."""

from __future__ import annotations

import torch


def register() -> None:
    @torch.library.register_fake("critlayers::gram_hsic")
    def _gram_hsic(feats, kernel, gammas, unbiased, tile):
        return feats[0].new_empty((len(feats), len(feats)), dtype=torch.float64)

    @torch.library.register_fake("critlayers::gram_hsic_accumulate")
    def _gram_hsic_accumulate(out, feats, kernel, gammas, unbiased, tile, alpha):
        return None

    @torch.library.register_fake("critlayers::gram_pair_hsic")
    def _gram_pair_hsic(grams_x, grams_y, unbiased, block_rows):
        return grams_x.new_empty((grams_x.shape[0], grams_y.shape[0]), dtype=torch.float64)

    @torch.library.register_fake("critlayers::center_gram")
    def _center_gram(gram, unbiased):
        return gram.new_empty(gram.shape, dtype=torch.float64)

    @torch.library.register_fake("critlayers::feature_moments_accumulate")
    def _feature_moments_accumulate(feats, shifts, pair_a, pair_b, cross, va, vb, colsum, qq,
                                    qsum, chunk_rows):
        return None
