"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751) after every attention and MLP block.

peft has no Houlsby adapter, so tinyml keeps its own: each adapter maps a block's output z to
z + up(gelu(down(z))), a residual bottleneck whose up-projection starts at zero, so a fresh adapter leaves the
model exactly as it was. The adapters run as forward hooks on the blocks: the adapted model keeps its own
module names and still saves as a plain Hugging Face model. The adapters save beside it in
`adapters.safetensors` (keys `PART.LAYER.attn|mlp.down|up.weight|bias`, tinyml's own format, not peft's), and
`tinyml_model.json` records their width and parts under `bottleneck_adapters`; `load_model` restores them.

TinyTL's lite residual branches (Cai et al. 2020, arXiv 2007.11622; `kind="lite"`) use the same machinery: one
branch per transformer layer, parallel to it, from the layer's input to its output (z + up(gelu(down(x)))),
beside the frozen layer; with biases trained too (peft.method=tinytl). TinyTL's point is memory: a frozen
weight needs no stored input for its gradient, and the branch's own activations are narrow, so training keeps
far fewer activations than LoRA, whose low-rank factors need the input of every adapted layer.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .. import UserError

FILE = "adapters.safetensors"


ATTN_NAMES = ("self_attn", "attention", "attn")


MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, size), nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z):
        return z + self.up(F.gelu(self.down(z)))


def _child(block: nn.Module, names) -> nn.Module | None:
    return next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The layers of a transformer found by shape: the largest ModuleList whose items all have an attention
    child (`self_attn`, `attention`, `attn`) and an MLP child (`mlp`, `feed_forward`, `ffn`, `ff`)."""
    best: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and all(
                _child(b, ATTN_NAMES) is not None and _child(b, MLP_NAMES) is not None for b in m):
            best = list(m)
    return best


def _out_dim(block: nn.Module) -> int:
    """Output width of an attention / MLP block: that of its last linear layer (o_proj, down_proj, fc2...)."""
    return [m for m in block.modules() if isinstance(m, nn.Linear)][-1].out_features


class LiteResidual(BottleneckAdapter):
    """TinyTL's lite residual for a transformer layer: a narrow branch from the layer's input, added to its
    output, starting at zero."""

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def _beside(branch: LiteResidual):
    def apply(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (output[0] + branch(x),) + tuple(output[1:])
        return output + branch(x)
    return apply


def _hook(adapter: BottleneckAdapter):
    def apply(module, args, output):
        if isinstance(output, tuple):  # attention blocks return (hidden, weights, ...)
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)
    return apply


def attach_adapters(model, parts: list[str], size: int, kind: str = "bottleneck") -> None:
    """Give each named part of an LMM an adapter after every attention and MLP block, or (kind "lite") a lite
    residual branch beside every layer (as `model.adapters`)."""
    if hasattr(model, "adapters"):  # a model that already has them (init_from an adapter run) keeps them
        return
    if size < 1:
        raise UserError(f"peft.adapter_size must be at least 1, got {size}")
    model.adapters = nn.ModuleDict()
    for part in parts:
        blocks = transformer_blocks(getattr(model, part))
        if not blocks:
            raise UserError(f"peft.method=adapter: the {part} ({type(getattr(model, part)).__name__}) has no "
                            f"transformer layers with attention and MLP blocks to put adapters after")
        dtype = next(getattr(model, part).parameters()).dtype
        per_layer = nn.ModuleList()
        for block in blocks if kind == "lite" else []:
            branch = LiteResidual(_out_dim(block), size).to(dtype)
            block.register_forward_hook(_beside(branch), with_kwargs=True)
            per_layer.append(branch)
        for block in blocks if kind != "lite" else []:
            pair = nn.ModuleDict()
            for key, names in (("attn", ATTN_NAMES), ("mlp", MLP_NAMES)):
                sub = _child(block, names)
                pair[key] = BottleneckAdapter(_out_dim(sub), size).to(dtype)
                sub.register_forward_hook(_hook(pair[key]))
            per_layer.append(pair)
        model.adapters[part] = per_layer
    model.spec["bottleneck_adapters"] = {"size": size, "parts": list(parts), "kind": kind}


def save_adapters(model, out: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.adapters.state_dict().items()}, str(out / FILE))


def load_adapters(model, path: Path) -> None:
    from safetensors.torch import load_file
    info = model.spec["bottleneck_adapters"]
    attach_adapters(model, info["parts"], info["size"], info.get("kind", "bottleneck"))
    model.adapters.load_state_dict(load_file(str(Path(path) / FILE)))
