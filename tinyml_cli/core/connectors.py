"""Connectors: image features of the vision tower -> embeddings in the LLM's space (linear, MLP, perceiver
resampler, Q-Former)."""


from __future__ import annotations

import torch
from torch import nn

from .. import UserError


# ----------------------------------------------------------------------------------------------- connectors
class MLPConnector(nn.Module):
    """`linear` (VILA) is one projection; `mlp2x_gelu` (LLaVA-1.5, TinyLLaVA) is Linear-GELU-Linear."""

    def __init__(self, vision_dim: int, llm_dim: int, depth: int):
        super().__init__()
        layers = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.proj = nn.Sequential(*layers)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x):
        return self.proj(x)


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_x, self.norm_q = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, latents, x):
        q = self.norm_q(latents)
        # Flamingo: the latents attend to the image features and to themselves (keys = [x; latents]).
        kv = torch.cat([self.norm_x(x), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


class ResamplerConnector(nn.Module):
    """Perceiver resampler (Flamingo): a fixed number of learned queries, whatever the number of patches."""
    layer = PerceiverLayer

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int, layers: int):
        super().__init__()
        heads = max(1, vision_dim // 64) if vision_dim % 64 == 0 else 1
        self.latents = nn.Parameter(torch.randn(num_queries, vision_dim) * 0.02)
        self.layers = nn.ModuleList(self.layer(vision_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return self.latents.shape[0]

    def forward(self, x):
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            lat = layer(lat, x)
        return self.proj(self.norm(lat))


class QFormerLayer(nn.Module):
    """A BLIP-2 Q-Former block: the queries attend to each other, then (cross-attention) to the image features,
    then an MLP; pre-norm residuals, as in the resampler above."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_c, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries, x):
        q = self.norm_q(queries)
        queries = queries + self.self_attn(q, q, q, need_weights=False)[0]
        kv = self.norm_x(x)
        queries = queries + self.cross_attn(self.norm_c(queries), kv, kv, need_weights=False)[0]
        return queries + self.ff(queries)


class QFormerConnector(ResamplerConnector):
    """Q-Former (BLIP-2, arXiv 2301.12597): learned queries read the image through cross-attention and come out
    as a fixed number of image tokens. BLIP-2 starts it from BERT and pretrains it with its own objectives;
    here it is trained from scratch like the other connectors (pretrain-align, then sft)."""
    layer = QFormerLayer


def build_connector(kind: str, vision_dim: int, llm_dim: int, queries: int = 16, layers: int = 2) -> nn.Module:
    if kind == "linear":
        return MLPConnector(vision_dim, llm_dim, 1)
    if kind == "mlp2x_gelu":
        return MLPConnector(vision_dim, llm_dim, 2)
    if kind == "resampler":
        return ResamplerConnector(vision_dim, llm_dim, queries, layers)
    if kind == "qformer":
        return QFormerConnector(vision_dim, llm_dim, queries, layers)
    raise UserError(f"unknown connector '{kind}' (choose linear, mlp2x_gelu, resampler or qformer)")


def connector_size(spec_or_cfg) -> tuple[int, int]:
    """(queries, layers) of a resampler or Q-Former, from a model config or a saved spec (a dict)."""
    get = spec_or_cfg.get if isinstance(spec_or_cfg, dict) else lambda k, d=None: getattr(spec_or_cfg, k, d)
    kind = "qformer" if get("connector") == "qformer" else "resampler"
    return get(f"{kind}_queries", 16 if kind == "resampler" else 32), get(f"{kind}_layers", 2)
