"""Connectors: image features of the vision tower -> embeddings in the LLM's space (linear, MLP, perceiver
resampler, Q-Former, C-Abstractor), or -> keys and values of gated cross-attention blocks inside the LLM
(Flamingo's xattn)."""

from __future__ import annotations

import math

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


class ResBlock(nn.Module):
    """A residual block on a feature map: GroupNorm -> 3x3 conv -> GELU -> GroupNorm -> 3x3 conv, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
                                  nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class CAbstractorConnector(nn.Module):
    """C-Abstractor (Honeybee, Cha et al. 2024, arXiv 2312.06742; MM1's connector): residual conv blocks on the
    patch grid, adaptive average pooling to `tokens` (a square number) positions, residual blocks again, then an
    MLP into the LLM. Unlike a resampler's learned queries, each output token summarises one region of the image,
    so locality survives the reduction. Honeybee uses RegNet blocks; plain residual blocks keep it small here."""

    def __init__(self, vision_dim: int, llm_dim: int, tokens: int, depth: int = 2):
        super().__init__()
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise UserError(f"model.connector_tokens={tokens}: the c-abstractor pools to a square grid "
                            f"(4, 9, 16, 64, 144, ...)")
        self.side = side
        self.before = nn.Sequential(*[ResBlock(vision_dim) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.after = nn.Sequential(*[ResBlock(vision_dim) for _ in range(depth)])
        self.proj = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def num_tokens(self, num_patches: int) -> int:
        return self.side * self.side

    def forward(self, x):
        b, n, d = x.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"c-abstractor: {n} patches do not form a square grid")
        x = x.transpose(1, 2).reshape(b, d, grid, grid)
        x = self.after(self.pool(self.before(x)))
        return self.proj(x.flatten(2).transpose(1, 2))


class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE block: the text attends to the visual tokens, then a feed-forward layer, each
    added behind tanh(alpha) with alpha starting at 0, so at initialisation the LLM computes exactly what it
    computed alone and training opens the gates."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, h, media):
        x = self.norm(h)
        h = h + torch.tanh(self.attn_gate).to(h.dtype) * self.attn(x, media, media, need_weights=False)[0]
        return h + torch.tanh(self.ff_gate).to(h.dtype) * self.ff(self.norm_ff(h))


class XAttnConnector(nn.Module):
    """Flamingo's way in (`model.connector: xattn`): a perceiver resampler turns each image into a few visual
    tokens, which enter the LLM as keys and values of a gated cross-attention block placed before every
    `every`-th decoder layer; no image token takes a place in the sequence. The blocks belong to this connector
    (they train and save with it); `attach` hooks them in front of the LLM's own layers, whose code is not copied.
    One image per record: every token of a record attends to its image's visual tokens."""

    def __init__(self, vision_dim: int, llm_dim: int, queries: int, layers: int, llm_layers: int, every: int):
        super().__init__()
        self.resampler = ResamplerConnector(vision_dim, llm_dim, queries, layers)
        heads = max(1, llm_dim // 64) if llm_dim % 64 == 0 else 1
        self.every = every
        self.blocks = nn.ModuleList(GatedCrossAttention(llm_dim, heads) for _ in range(0, llm_layers, every))
        self.media = None  # (B, queries, llm_dim) of the batch running now, set by the model before its decoder runs

    def num_tokens(self, num_patches: int) -> int:
        return 0

    def forward(self, x):
        return self.resampler(x)

    def attach(self, layers) -> list:
        """Put block k before decoder layer k * every (a forward pre-hook on that layer); returns the handles."""
        def hook(block):
            def run(module, args, kwargs):
                if self.media is None:
                    return None
                if args:
                    return (block(args[0], self.media.to(args[0].dtype)), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"], self.media.to(kwargs["hidden_states"].dtype))}
            return run
        return [layers[i * self.every].register_forward_pre_hook(hook(b), with_kwargs=True)
                for i, b in enumerate(self.blocks)]


def build_connector(kind: str, vision_dim: int, llm_dim: int, queries: int = 16, layers: int = 2,
                    llm_layers: int = 0, every: int = 1) -> nn.Module:
    if kind == "linear":
        return MLPConnector(vision_dim, llm_dim, 1)
    if kind == "mlp2x_gelu":
        return MLPConnector(vision_dim, llm_dim, 2)
    if kind == "resampler":
        return ResamplerConnector(vision_dim, llm_dim, queries, layers)
    if kind == "qformer":
        return QFormerConnector(vision_dim, llm_dim, queries, layers)
    if kind == "c-abstractor":
        return CAbstractorConnector(vision_dim, llm_dim, queries)
    if kind == "xattn":
        return XAttnConnector(vision_dim, llm_dim, queries, layers, llm_layers, every)
    raise UserError(f"unknown connector '{kind}' (choose linear, mlp2x_gelu, resampler, qformer, c-abstractor or xattn)")


def connector_size(spec_or_cfg) -> tuple[int, int]:
    """(queries or tokens, layers) of a resampler, Q-Former, xattn's resampler or C-Abstractor, from a model
    config or a saved spec (a dict)."""
    get = spec_or_cfg.get if isinstance(spec_or_cfg, dict) else lambda k, d=None: getattr(spec_or_cfg, k, d)
    if get("connector") == "c-abstractor":
        return get("connector_tokens", 16), 2
    kind = "qformer" if get("connector") == "qformer" else "resampler"
    return get(f"{kind}_queries", 16 if kind == "resampler" else 32), get(f"{kind}_layers", 2)
