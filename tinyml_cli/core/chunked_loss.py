"""Losses over the vocabulary that never hold a [tokens x vocabulary] tensor: log-probs of labelled tokens (sft,
pretrain-align, dpo, ppo) and the KL to a teacher (BitDelta distillation), computed in chunks of rows.

The logits of one chunk exist at a time, in the forward pass and, where needed, again in the backward pass:
- When the gradient's direction is known in the forward pass, it is taken there and the chunk's logits are
  dropped at once: the head is frozen (LoRA, QLoRA, DPO / PPO with adapters, distillation) or the loss is a plain
  sum over tokens (sft's mean, the KL). d logp / d logits = onehot - softmax, so d/dh = (onehot - softmax) W and,
  for a sum, d/dW = sum (onehot - softmax)^T h; the backward pass only scales them by the incoming gradient
  (the fused linear cross-entropy of Liger-Kernel and TRL works this way). That costs no extra matmul.
- When the head trains and each token gets its own incoming gradient (dpo / ppo fine-tuning in full), only
  the log-sum-exp of each row is kept and the chunk's logits are recomputed in the backward pass: one more
  matmul of the labelled rows.
A head that is not a plain `nn.Linear` (a peft-wrapped output layer, a quantized one) takes the generic route:
`torch.utils.checkpoint` per chunk, which recomputes the chunk's forward in the backward pass.
`chunked=False` keeps the earlier computation (the fp32 log-softmax of every labelled row at once), for
comparison (`train.chunked_loss: false`).
Mixed precision is that of a plain `head(h).float()` under autocast: the matmuls run in the autocast dtype,
softmax and sums in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 128 << 20  # fp32 logits of one chunk: 261 rows of a 128k vocabulary, 1048 of a 32k one


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: 128 MiB of fp32 logits, between 64 and 2048 rows."""
    return max(64, min(2048, CHUNK_BYTES // (4 * vocab)))


def _plain_linear(head) -> bool:
    return type(head) is nn.Linear and head.weight.is_floating_point()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _matmuls(g, h, w, dh, gw, start: int) -> None:
    """dh[rows] = g W and gw += g^T h for one chunk, written in place where the dtypes allow (no weight-sized
    temporary when the weights are in the compute dtype)."""
    if dh is not None:
        if dh.dtype == g.dtype:
            torch.mm(g, w, out=dh[start:start + g.shape[0]])
        else:
            dh[start:start + g.shape[0]] = g @ w
    if gw is not None:
        if gw.dtype == g.dtype:
            gw.addmm_(g.t(), h)
        else:
            gw.add_((g.t() @ h).to(gw.dtype))


class _LabelLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[y] / T per row (or their sum), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, reduce, want_entropy):
        dt = _compute_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        ahead = (need_h or need_w or need_b) and (reduce or not (need_w or need_b))  # gradient taken now
        n = targets.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(logps) if want_entropy else None
        lse_all = torch.empty_like(logps) if (need_w or need_b) and not ahead else None
        dh = torch.empty_like(hidden) if ahead and need_h else None
        gw = torch.zeros_like(weight) if ahead and need_w else None
        gb = torch.zeros_like(bias) if ahead and need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
            for s in range(0, n, rows):
                h, y = hidden[s:s + rows].to(dt), targets[s:s + rows, None]
                z = F.linear(h, w, b).float()
                if temperature != 1.0:
                    z.div_(temperature)
                lse = torch.logsumexp(z, -1)
                logp = z.sub_(lse[:, None])  # log-softmax, in z's memory
                logps[s:s + rows] = logp.gather(1, y).squeeze(1)
                if lse_all is not None:
                    lse_all[s:s + rows] = lse
                if not (ahead or want_entropy):
                    continue
                if want_entropy:
                    p = logp.exp()
                    ent[s:s + rows] = -(p * logp).sum(-1)
                else:
                    p = logp.exp_()
                del z, logp
                if ahead:
                    g = p.neg_().scatter_add_(1, y, torch.ones_like(lse)[:, None])  # onehot - softmax
                    if temperature != 1.0:
                        g.div_(temperature)
                    gd = g.to(dt)
                    _matmuls(gd, h, w, dh, gw, s)
                    if gb is not None:
                        gb.add_(g.sum(0).to(gb.dtype))
        if lse_all is not None:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        # Gradients taken ahead are kept on ctx, not saved through autograd's saved-tensor hooks: activation
        # offloading would otherwise send them to the host and back, though the backward pass needs them first.
        ctx.grads = (dh, gw, gb)
        ctx.ahead, ctx.reduce, ctx.temperature, ctx.rows, ctx.dt = ahead, reduce, temperature, rows, dt
        if want_entropy:
            ctx.mark_non_differentiable(ent)
        out = logps.sum() if reduce else logps
        return (out, ent) if want_entropy else out

    @staticmethod
    def backward(ctx, grad, *_):
        none = (None,) * 5
        if ctx.ahead:
            (dh, gw, gb), ctx.grads = ctx.grads, None
            # scaled in place: these buffers are this node's alone, and become the gradients
            if ctx.reduce:
                return (*(x.mul_(grad) if x is not None else None for x in (dh, gw, gb)), *none)
            return (dh.mul_(grad[:, None].to(dh.dtype)) if dh is not None else None, None, None, *none)
        # the head trains and every row has its own gradient: recompute each chunk's logits
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        dt, rows, temperature = ctx.dt, ctx.rows, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
            for s in range(0, targets.shape[0], rows):
                h, y = hidden[s:s + rows].to(dt), targets[s:s + rows, None]
                z = F.linear(h, w, b).float()
                if temperature != 1.0:
                    z.div_(temperature)
                g = z.sub_(lse_all[s:s + rows, None]).exp_().neg_().scatter_add_(1, y, torch.ones_like(z[:, :1]))
                g.mul_(grad[s:s + rows, None] / temperature)
                gd = g.to(dt)
                _matmuls(gd, h, w, dh, gw, s)
                if gb is not None:
                    gb.add_(g.sum(0).to(gb.dtype))
        return dh, gw, gb, *none


def _chunk_logps(head, h, y, temperature):
    z = head(h).float() / temperature
    lp = torch.log_softmax(z, -1)
    with torch.no_grad():
        ent = -(lp.exp() * lp).sum(-1)
    return lp.gather(1, y[:, None]).squeeze(1), ent


def label_logps(head, hidden, targets, temperature: float = 1.0, reduce: bool = False, entropy: bool = False,
                chunked: bool = True):
    """Log-prob of each target token given its hidden row, (N,) fp32, or their sum with `reduce`; with `entropy`
    also the entropy of each row's distribution (no gradient). `head` projects hidden rows onto the vocabulary."""
    if not chunked:  # the earlier computation: every labelled row's fp32 log-softmax at once
        lp_all = torch.log_softmax(head(hidden).float() / temperature, -1)
        lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
        ent = -(lp_all.exp() * lp_all).sum(-1) if entropy else None
    elif _plain_linear(head):
        w, b = head.weight, head.bias
        if not torch.is_grad_enabled():  # no gradient wanted: nothing to take ahead or to keep
            hidden, w, b = hidden.detach(), w.detach(), None if b is None else b.detach()
        return _LabelLogps.apply(hidden, w, b, targets, float(temperature), chunk_rows(head.out_features), reduce,
                                 entropy)
    else:  # any other head module: checkpoint each chunk (recomputed in the backward pass)
        from torch.utils.checkpoint import checkpoint
        rows = chunk_rows(getattr(head, "out_features", 0) or 32_000)
        parts = [checkpoint(_chunk_logps, head, hidden[s:s + rows], targets[s:s + rows], float(temperature),
                            use_reentrant=False) for s in range(0, targets.shape[0], rows)]
        lp = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
        ent = torch.cat([p[1] for p in parts]) if parts else lp.detach()
    out = lp.sum() if reduce else lp
    return (out, ent) if entropy else out


def mean_nll(head, hidden, targets, chunked: bool = True) -> torch.Tensor:
    """Mean next-token negative log-likelihood of `targets` (the sft / pretrain-align loss)."""
    return -label_logps(head, hidden, targets, reduce=True, chunked=chunked) / targets.shape[0]


class _HeadKL(torch.autograd.Function):
    """Mean over rows of KL(teacher || student) of softmax(h W^T + b), chunk by chunk, the gradient taken in the
    forward pass: d/d logits_student = (softmax_student - p_teacher) / rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, rows):
        dt = _compute_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
            tw, tb = t_weight.to(dt), (t_bias.to(dt) if t_bias is not None else None)
            for s in range(0, n, rows):
                h = hidden[s:s + rows].to(dt)
                t = torch.log_softmax(F.linear(t_hidden[s:s + rows].to(dt), tw, tb).float(), -1)
                ls = torch.log_softmax(F.linear(h, w, b).float(), -1)
                pt = t.exp()
                total += (pt * (t - ls)).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = ls.exp_().sub_(pt).div_(n)  # d KL / d student logits
                gd = g.to(dt)
                _matmuls(gd, h, w, dh, gw, s)
                if gb is not None:
                    gb.add_(g.sum(0).to(gb.dtype))
        ctx.grads = (dh, gw, gb)  # on ctx, not through saved-tensor hooks (see _LabelLogps)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        (dh, gw, gb), ctx.grads = ctx.grads, None
        return (*(x.mul_(grad) if x is not None else None for x in (dh, gw, gb)), None, None, None, None)


def logits_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) between the softmax distributions of two [N, V] logits."""
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - F.log_softmax(student.float(), -1))).sum(-1).mean()


def head_kl(head, hidden, t_head, t_hidden, chunked: bool = True) -> torch.Tensor:
    """Mean KL(teacher || student) over rows, student logits head(hidden), teacher logits t_head(t_hidden)
    (the teacher's side without gradient)."""
    if chunked and _plain_linear(head) and _plain_linear(t_head):
        w, b = head.weight, head.bias
        if not torch.is_grad_enabled():
            hidden, w, b = hidden.detach(), w.detach(), None if b is None else b.detach()
        return _HeadKL.apply(hidden, w, b, t_hidden.detach(), t_head.weight.detach(),
                             None if t_head.bias is None else t_head.bias.detach(), chunk_rows(head.out_features))
    if not chunked:
        with torch.no_grad():
            target = t_head(t_hidden)
        return logits_kl(head(hidden), target)
    from torch.utils.checkpoint import checkpoint
    rows = chunk_rows(getattr(head, "out_features", 0) or 32_000)
    n = hidden.shape[0]

    def part(h, th):
        with torch.no_grad():
            target = t_head(th)
        return logits_kl(head(h), target) * h.shape[0]
    return sum(checkpoint(part, hidden[s:s + rows], t_hidden[s:s + rows], use_reentrant=False)
               for s in range(0, n, rows)) / n


def head_mse(head, hidden, t_head, t_hidden, chunked: bool = True) -> torch.Tensor:
    """Mean over rows and vocabulary of (head(hidden) - t_head(t_hidden))^2 (the teacher's side without gradient);
    chunked: one chunk of rows' logits at a time, recomputed in the backward pass."""
    rows = chunk_rows(getattr(head, "out_features", 0) or 32_000) if chunked else hidden.shape[0]

    def part(h, th):
        with torch.no_grad():
            target = t_head(th).float()
        return torch.nn.functional.mse_loss(head(h).float(), target, reduction="sum")
    if not chunked or hidden.shape[0] <= rows:
        total = part(hidden, t_hidden)
    else:
        from torch.utils.checkpoint import checkpoint
        total = sum(checkpoint(part, hidden[s:s + rows], t_hidden[s:s + rows], use_reentrant=False)
                    for s in range(0, hidden.shape[0], rows))
    with torch.no_grad():
        vocab = t_head(t_hidden[:1]).shape[-1]
    return total / (hidden.shape[0] * vocab)
