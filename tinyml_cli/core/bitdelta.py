"""BitDelta (Liu et al. 2024, arXiv 2402.10193): a fine-tuned model as its base + 1-bit weight deltas.

For every linear weight, Δ = W_ft − W_base is stored as its sign bits (+1 where Δ > 0, −1 elsewhere), packed
8 per byte, and one scale per matrix, initialised to mean |Δ| (the scale that minimises the L2 error of
scale·sign(Δ)); scale distillation (`distill_step`) then trains only the scales, fitting the fine-tuned model's
logits by their mean squared error (the paper's objective) or by KL. Like the paper, embeddings and the output
head are not compressed: they and every other parameter that differs (norms, biases, convolutions, ...) are
kept whole in the delta, as the fine-tuned values.

A delta folder holds
    bitdelta.json        shapes of the compressed matrices, sizes, the fine-tuned model's spec, a base check
    signs.safetensors    packed sign bits, uint8, one tensor per compressed matrix (named like its module)
    scales.safetensors   one fp32 scale per compressed matrix
    full.safetensors     the other parameters that differ from the base, whole

Linear layers are found by type (`nn.Linear`), not by name, so any architecture works; a Linear whose forward
its parent never calls (nn.MultiheadAttention reads `out_proj.weight` directly) is kept whole instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import UserError
from .chunked_loss import logits_kl

FORMAT = "tinyml-bitdelta/1"


_BITS = 2 ** torch.arange(8, dtype=torch.uint8)  # bit i of a byte holds element 8k+i


# ----------------------------------------------------------------------------------------- sign bits
def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Sign bits of a tensor (1 where > 0), 8 per byte, flattened; the last byte is zero-padded."""
    bits = (delta.reshape(-1) > 0).to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    return (bits * _BITS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """±1 tensor of `shape` from packed sign bits."""
    n = torch.Size(shape).numel()
    bits = (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).reshape(-1)[:n]
    return (bits.to(dtype) * 2 - 1).view(shape)


# ------------------------------------------------------------------------------------ which layers
def delta_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear layers that BitDelta compresses, by module name.

    Every nn.Linear except: output heads (`get_output_embeddings()` of any HF model inside), layers whose
    weight is an embedding's (tied), and the out_proj of nn.MultiheadAttention (its parent never calls it).
    """
    skip = set()
    for m in model.modules():
        if hasattr(m, "config") and callable(getattr(m, "get_output_embeddings", None)):
            skip.add(id(m.get_output_embeddings()))
        if isinstance(m, nn.MultiheadAttention):
            skip.update(id(c) for c in m.children())
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in skip and id(m.weight) not in tied}


# -------------------------------------------------------------------------------------------- delta
@dataclass
class BitDelta:
    signs: dict = field(default_factory=dict)   # module name -> packed uint8
    scales: dict = field(default_factory=dict)  # module name -> fp32 scalar
    shapes: dict = field(default_factory=dict)  # module name -> weight shape
    full: dict = field(default_factory=dict)    # parameter name -> fine-tuned tensor
    info: dict = field(default_factory=dict)    # spec of the fine-tuned model, base check, ...

    def sizes(self) -> dict:
        """Bytes of the delta and of the fp16 delta it replaces; which tensors each figure counts."""
        n_lin = sum(torch.Size(s).numel() for s in self.shapes.values())
        bits = sum(p.numel() for p in self.signs.values()) + 4 * len(self.scales)
        full = sum(t.numel() * t.element_size() for t in self.full.values())
        full_fp16 = 2 * sum(t.numel() for t in self.full.values())
        return {"compressed_matrices": len(self.shapes), "compressed_params": n_lin,
                "bitdelta_bytes": bits, "fp16_delta_bytes": 2 * n_lin,
                "ratio": 2 * n_lin / bits if bits else 0.0,
                "full_tensors": len(self.full), "full_params": sum(t.numel() for t in self.full.values()),
                "full_bytes": full,
                "ratio_total": (2 * n_lin + full_fp16) / (bits + full) if bits + full else 0.0}

    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.signs.items()}, str(out / "signs.safetensors"))
        save_file({k: v.detach().float().reshape(()) for k, v in self.scales.items()}, str(out / "scales.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in self.full.items()}, str(out / "full.safetensors"))
        meta = {"format": FORMAT, "shapes": {k: list(v) for k, v in self.shapes.items()}, "sizes": self.sizes(),
                **self.info}
        (out / "bitdelta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "BitDelta":
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / "bitdelta.json").is_file():
            raise UserError(f"not a BitDelta folder (no bitdelta.json): {path}")
        meta = json.loads((path / "bitdelta.json").read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: unknown BitDelta format {meta.get('format')!r} (expected {FORMAT})")
        shapes = {k: torch.Size(v) for k, v in meta.pop("shapes").items()}
        meta.pop("format"), meta.pop("sizes", None)
        return cls(load_file(str(path / "signs.safetensors")), load_file(str(path / "scales.safetensors")),
                   shapes, load_file(str(path / "full.safetensors")), meta)


def _base_check(linears: dict) -> float:
    """A cheap fingerprint of the base (sum of |W| of the compressed matrices), to refuse a wrong base."""
    return float(sum(m.weight.detach().double().abs().sum() for m in linears.values()))


def _state(model: nn.Module) -> dict:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def compress(base: nn.Module, finetuned: nn.Module) -> BitDelta:
    """The BitDelta of two models of one architecture, one matrix at a time (scales = mean |Δ|)."""
    base_state, ft_state = _state(base), _state(finetuned)
    if {k: tuple(v.shape) for k, v in base_state.items()} != {k: tuple(v.shape) for k, v in ft_state.items()}:
        raise UserError("BASE and FINETUNED have different parameters or shapes (not one architecture)")
    linears = delta_linears(base)
    delta = BitDelta(info={"base_check": _base_check(linears)})
    with torch.no_grad():
        for name, lin in linears.items():
            d = ft_state[f"{name}.weight"].float() - lin.weight.float()  # the only full-size temporary
            if not d.any():
                continue  # unchanged by fine-tuning: nothing to store
            delta.signs[name], delta.scales[name] = pack_signs(d).cpu(), d.abs().mean().cpu()
            delta.shapes[name] = lin.weight.shape
        done = {f"{n}.weight" for n in delta.signs}
        seen = set()  # a tied tensor (embedding = head) is stored once, under its first name
        for k, v in ft_state.items():
            if k not in done and v.data_ptr() not in seen and not torch.equal(v, base_state[k]):
                delta.full[k] = v.detach().cpu().clone()
            seen.add(v.data_ptr())
    return delta


def _check_base(model: nn.Module, delta: BitDelta) -> dict:
    linears = delta_linears(model)
    missing = [n for n in delta.signs if n not in linears or linears[n].weight.shape != delta.shapes[n]]
    missing += [n for n in delta.full if n not in _state(model)]
    if missing:
        raise UserError(f"the delta does not fit this base: no matching layer {missing[0]}")
    want, got = delta.info.get("base_check"), _base_check(linears)
    if want is not None and abs(got - want) > 1e-4 * max(abs(want), 1.0):
        raise UserError("the delta was made from a different base model (its weights do not match)")
    return linears


def apply_delta(model: nn.Module, delta: BitDelta) -> nn.Module:
    """W_base + scale·sign(Δ) in place for every compressed matrix; the kept tensors copied in."""
    linears, state = _check_base(model, delta), _state(model)
    with torch.no_grad():
        for name, v in delta.full.items():
            state[name].copy_(v)
        for name, packed in delta.signs.items():
            w = linears[name].weight
            d = float(delta.scales[name]) * unpack_signs(packed.to(w.device), w.shape)
            w.copy_((w.float() + d).to(w.dtype))
    return model


# ------------------------------------------------------------------------- serving without merging
class _SignMatmul(torch.autograd.Function):
    """x @ sign^T with the ±1 matrix unpacked only for the call: backward keeps the packed bits, not it."""

    @staticmethod
    def forward(ctx, x, packed, shape):
        ctx.save_for_backward(packed)
        ctx.shape = shape
        return x @ unpack_signs(packed, shape, x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad @ unpack_signs(packed, ctx.shape, grad.dtype), None, None


class BitDeltaLinear(nn.Module):
    """A base nn.Linear plus scale·sign(Δ): y = base(x) + scale · (x @ sign^T). Only `scale` may train."""

    def __init__(self, base: nn.Linear, packed: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("signs", packed.to(base.weight.device), persistent=False)
        self.scale = nn.Parameter(scale.detach().float().reshape(()).to(base.weight.device).clone())

    def forward(self, x):
        z = _SignMatmul.apply(x, self.signs, self.base.weight.shape)
        return self.base(x) + self.scale.to(z.dtype) * z


@contextlib.contextmanager
def delta_attached(model: nn.Module, delta: BitDelta):
    """The base model serving a delta until the block ends: BitDeltaLinear wrappers in place of its compressed
    linears, the kept tensors swapped in. Yields {module name: wrapper}; the base is restored afterwards, so
    one loaded base serves several deltas in turn."""
    linears, state = _check_base(model, delta), _state(model)
    saved = {}
    wrappers = {}
    try:
        with torch.no_grad():
            for name, v in delta.full.items():
                saved[name] = state[name].detach().clone()
                state[name].copy_(v)
        for name, packed in delta.signs.items():
            parent, _, child = name.rpartition(".")
            wrappers[name] = BitDeltaLinear(linears[name], packed, delta.scales[name])
            setattr(model.get_submodule(parent), child, wrappers[name])
        yield wrappers
    finally:
        for name in wrappers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linears[name])
        with torch.no_grad():
            for name, v in reversed(saved.items()):
                state[name].copy_(v)


# --------------------------------------------------------------------------------- tinyml folders
def load_full_precision(path: str | Path, dtype=None):
    """A tinyml model folder with any peft adapter merged into the weights (BitDelta needs full weights)."""
    from .model import load_model
    model = load_model(path, dtype=dtype)
    if getattr(model.base_llm(), "is_loaded_in_4bit", False):
        raise UserError(f"{path}: a 4-bit (QLoRA) model; BitDelta needs full-precision weights")
    if model.peft_parts():
        model.merge_adapters()
    return model


def logits_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean squared difference of two [N, V] logits: the paper's objective (section 3.2, and
    `F.mse_loss(logits, target_logits)` in its reference code)."""
    return F.mse_loss(student.float(), teacher.float())


def _fit(student, teacher, batch, loss: str) -> tuple[torch.Tensor, int]:
    """The student's fit to the teacher's next-token logits, mean over every real (non-pad) position (`mse`:
    their mean squared error; `kl`: KL(teacher || student)), and the number of positions. Computed from both
    models' hidden states in chunks of rows (core.chunked_loss): neither model's [positions x vocabulary]
    logits are held whole."""
    from .chunked_loss import head_kl, head_mse
    mask = batch["attention_mask"].bool()
    args = (batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    with torch.no_grad():
        t_hidden = teacher.hidden_states(*args)[mask]
    fit = head_mse if loss == "mse" else head_kl
    value = fit(student.head, student.hidden_states(*args)[mask], teacher.head, t_hidden,
                chunked=getattr(student, "chunked_loss", True))
    return value, int(mask.sum())


class Distillation(nn.Module):
    """Scale distillation for the training loop: the student (the base with its deltas attached) whose forward is
    its fit to the teacher (`loss`: mse, the paper's, or kl), so the call that trains is the one DDP synchronises.
    The teacher is held apart, not as a submodule: frozen, and never prepared, saved or checkpointed with the
    student."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str = "mse"):
        super().__init__()
        self.student, self._teacher, self.loss = student, (teacher,), loss

    def forward(self, input_ids, attention_mask, pixel_values=None, **_):
        teacher = self._teacher[0].to(input_ids.device)
        return _fit(self.student, teacher, {"input_ids": input_ids, "attention_mask": attention_mask,
                                            "pixel_values": pixel_values}, self.loss)[0]


def distill_step(model: Distillation, batch):
    """The training step over a `Distillation`: its fit on every real position."""
    return model(**batch), int(batch["attention_mask"].sum()), {}


def _logits(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))


@torch.no_grad()
def fit_to_teacher(student, teacher, examples, collate, batch_size: int = 16) -> dict:
    """How close the student is to the teacher over examples, position-weighted: KL(teacher || student), logit
    MSE, and `top1_agreement`, the share of positions where both predict the same next token (a figure that
    neither distillation objective optimises directly)."""
    sums, n = {"kl": 0.0, "mse": 0.0, "top1_agreement": 0.0}, 0
    student.eval()
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(student.device) for k, v in collate(examples[i:i + batch_size]).items()}
        mask = batch["attention_mask"].bool()
        s, t = _logits(student, batch)[mask], _logits(teacher, batch)[mask]
        k = int(mask.sum())
        sums["kl"] += float(logits_kl(s, t)) * k
        sums["mse"] += float(logits_mse(s, t)) * k
        sums["top1_agreement"] += float((s.argmax(-1) == t.argmax(-1)).sum())
        n += k
    return {name: v / max(n, 1) for name, v in sums.items()}


def mean_kl(student, teacher, examples, collate, batch_size: int = 16) -> float:
    """Token-weighted mean KL(teacher || student) over examples."""
    return fit_to_teacher(student, teacher, examples, collate, batch_size)["kl"]
