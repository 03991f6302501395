"""Log-probs of labelled tokens: what the preference and RL objectives (dpo, ppo) compare and train."""

from __future__ import annotations

import torch
from torch import nn

from ..records.preferences import Pair
from .batching import pair_batches


def token_logps(model, input_ids, attention_mask, labels, pixel_values=None, with_entropy: bool = False,
                temperature: float = 1.0):
    """Log-prob of every labelled token under the model: (logps, mask[, entropy, hidden]), each (B, T-1).

    Position t holds token t+1 (the next-token layout); logits are computed only where a label is. With a
    temperature, the log-probs are those of the tempered distribution the tokens were sampled from (PPO).
    """
    from .chunked_loss import label_logps
    hidden = model.hidden_states(input_ids, attention_mask, pixel_values)
    y = labels[:, 1:]
    mask = y != -100
    out = label_logps(model.head, hidden[:, :-1][mask], y[mask], temperature, entropy=with_entropy,
                      chunked=getattr(model, "chunked_loss", True))
    logps = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    logps[mask] = out[0] if with_entropy else out
    if not with_entropy:
        return logps, mask
    ent = torch.zeros_like(logps)
    ent[mask] = out[1].detach()
    return logps, mask, ent, hidden


def last_token_index(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last labelled token of each row (the end of the response)."""
    has = labels != -100
    return labels.shape[1] - 1 - has.flip(-1).int().argmax(-1)


@torch.no_grad()
def policy_logps(model, pairs: list[Pair], collate, batch_size: int = 32) -> torch.Tensor:
    """Summed response log-probs of every pair under a model: (N, 2) = (chosen, rejected), (N, 3) with mDPO's
    chosen answer under the corrupted image last."""
    was = model.training
    model.eval()
    out = []
    for chunk, b in pair_batches(pairs, collate, batch_size, model.device):
        lp, mask = token_logps(model, b["input_ids"], b["attention_mask"], b["labels"], b.get("pixel_values"))
        s = (lp * mask).sum(-1).cpu()
        out.append(s.view(-1, len(chunk)).T)
    model.train(was)
    return torch.cat(out)


class TokenLogps(nn.Module):
    """The model with `token_logps` as its forward, so that an objective on log-probs (dpo, grpo) trains through
    `forward`: the call DDP synchronises gradients for. With `entropy`, forward returns (logps, mask, entropy)."""

    def __init__(self, lmm, temperature: float = 1.0, entropy: bool = False):
        super().__init__()
        self.lmm, self.temperature, self.entropy = lmm, temperature, entropy

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, **_):
        out = token_logps(self.lmm, input_ids, attention_mask, labels, pixel_values, with_entropy=self.entropy,
                          temperature=self.temperature)
        return out[:3]
