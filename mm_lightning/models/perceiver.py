"""Perceiver resampler: a few query tokens read a long feature sequence.

Hand-written because neither diffusers nor transformers exposes a stand-alone resampler
with *external* queries (MagicMirror's ID branch queries with an identity embedding). The
layout follows the IP-Adapter/PhotoMaker resampler: each layer lets the queries attend to
[features, queries], then a feed-forward, both pre-norm and residual.
"""

import torch
from torch import nn
from torch.nn import functional as F


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_features = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # queries: [B, Q, dim], features: [B, N, dim]
        q_in = self.norm_queries(queries)
        kv_in = torch.cat([self.norm_features(features), q_in], dim=1)  # [B, N+Q, dim]
        q = self.to_q(q_in)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, *, d]
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, Q, dim]
        queries = queries + self.to_out(attn)
        return queries + self.ff(queries)


class PerceiverResampler(nn.Module):
    """features [B, N, feature_dim] + queries [B, Q, dim] -> [B, Q, output_dim]."""

    def __init__(self, feature_dim: int, dim: int, output_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.proj_in = nn.Linear(feature_dim, dim)
        self.layers = nn.ModuleList(PerceiverLayer(dim, num_heads) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.norm_out(self.proj_out(queries))
