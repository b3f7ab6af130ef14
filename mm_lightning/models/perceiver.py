"""Perceiver resampler: a few query tokens read a long feature sequence.

Hand-written because neither diffusers nor transformers exposes a stand-alone resampler
with *external* queries (MagicMirror's ID branch queries with an identity embedding). The
layout, parameter names included, is PhotoMaker(V2)'s `FacePerceiverResampler` (itself
IP-Adapter's), so PhotoMakerV2's ID perceiver loads into it key for key: each layer is
[attention, feed-forward]; the queries attend to [features, queries], both pre-norm and
residual; the feed-forward has no biases.
"""

import torch
from torch import nn
from torch.nn import functional as F


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)  # features
        self.norm2 = nn.LayerNorm(dim)  # queries
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # features: [B, N, dim], queries: [B, Q, dim] -> [B, Q, dim]
        q_in = self.norm2(queries)
        kv_in = torch.cat([self.norm1(features), q_in], dim=1)  # [B, N+Q, dim]
        q = self.to_q(q_in)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, *, d]
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """features [B, N, feature_dim] + queries [B, Q, dim] -> [B, Q, output_dim]."""

    def __init__(self, feature_dim: int, dim: int, output_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.proj_in = nn.Linear(feature_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, num_heads), feed_forward(dim)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, ff in self.layers:
            queries = queries + attention(features, queries)
            queries = queries + ff(queries)
        return self.norm_out(self.proj_out(queries))
