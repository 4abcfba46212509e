"""Workloads shared by the peer benchmark runner and its pytest-benchmark file.

Engine workloads are stacks of float32 layer activations shaped like a residual stream: a
low-rank latent signal that drifts from layer to layer, isotropic noise, and a per-layer mean
offset. The model workload is a pair of small randomly initialised transformer encoders compared
block by block on the same token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ENGINE_WORKLOADS = {
    # name: (n_layers, n, d)
    "A": (18, 512, 640),
    "B": (32, 300, 4096),
    "C": (18, 4096, 640),
    "D": (2, 8192, 1024),
}

MODEL_WORKLOAD = {"n": 256, "batch_size": 32, "seq": 16, "d_model": 128, "depth": 6}


def layer_features(n_layers: int, n: int, d: int, seed: int = 0, rank: int = 32) -> torch.Tensor:
    """Synthetic activations, shape (n_layers, n, d), float32.

    Layer ``l`` is ``z a_l + 0.5 * noise + offset_l`` where the latent ``z`` (n, rank) is shared,
    the mixing ``a_l`` (rank, d) drifts by a random step per layer, and ``offset_l`` (d,) is a mean
    shift, so neighbouring layers are similar and distant ones less so.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    mix = torch.randn(rank, d, generator=g) / rank**0.5
    out = torch.empty(n_layers, n, d)
    for layer in range(n_layers):
        mix = mix + 0.35 * torch.randn(rank, d, generator=g) / rank**0.5
        offset = 2.0 * torch.randn(d, generator=g)
        out[layer] = z @ mix + 0.5 * torch.randn(n, d, generator=g) + offset
    return out


@dataclass
class ModelPair:
    model1: nn.Module
    model2: nn.Module
    layers: list[str]
    inputs: torch.Tensor


def model_pair(seed: int = 0) -> ModelPair:
    """Two randomly initialised transformer encoders and their token-embedding inputs."""
    cfg = MODEL_WORKLOAD

    def encoder(s: int) -> nn.Module:
        torch.manual_seed(s)
        layer = nn.TransformerEncoderLayer(cfg["d_model"], nhead=4, dim_feedforward=4 * cfg[
            "d_model"], dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, cfg["depth"], enable_nested_tensor=False).eval()

    g = torch.Generator().manual_seed(seed + 100)
    inputs = torch.randn(cfg["n"], cfg["seq"], cfg["d_model"], generator=g)
    layers = [f"layers.{i}" for i in range(cfg["depth"])]
    return ModelPair(encoder(seed), encoder(seed + 1), layers, inputs)
