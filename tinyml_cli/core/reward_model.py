"""Scalar heads on the LMM: the reward model (Bradley-Terry score at the last response token) and PPO's
actor-critic (the policy's token log-probs and a value per token from one backbone)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import UserError
from .logprobs import last_token_index, token_logps


class ScalarHead(nn.Module):
    """The LMM with a linear head giving one number per position; used as reward model and as PPO critic."""

    def __init__(self, lmm, init_std: float | None = None):
        super().__init__()
        self.lmm = lmm
        self.head = nn.Linear(lmm.hidden_size, 1)
        if init_std is not None:
            nn.init.normal_(self.head.weight, std=init_std)
            nn.init.zeros_(self.head.bias)
        self.head.to(lmm.dtype)

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, **_):
        """Score of each row at its last response token (the Bradley-Terry reward)."""
        hidden = self.lmm.hidden_states(input_ids, attention_mask, pixel_values)
        last = last_token_index(labels)
        h = hidden[torch.arange(len(last), device=last.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def save_reward_model(rm: ScalarHead, out: Path) -> None:
    from safetensors.torch import save_file
    rm.lmm.save(out)
    save_file({k: v.detach().contiguous() for k, v in rm.head.state_dict().items()}, str(out / "reward_head.safetensors"))


def load_reward_model(path: str | Path, dtype=None) -> ScalarHead:
    from safetensors.torch import load_file

    from .model import load_model
    path = Path(path)
    if not (path / "reward_head.safetensors").is_file():
        raise UserError(f"not a reward model folder (no reward_head.safetensors): {path}")
    rm = ScalarHead(load_model(path, dtype=dtype))
    rm.head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    return rm.eval()


class ActorCritic(nn.Module):
    """PPO's policy and critic in one forward (the call DDP synchronises): log-probs of the labelled tokens under
    the tempered policy, their entropy, and the value head's estimate at each position."""

    def __init__(self, critic: ScalarHead, temperature: float):
        super().__init__()
        self.critic, self.temperature = critic, temperature

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, **_):
        lp, _, ent, hidden = token_logps(self.critic.lmm, input_ids, attention_mask, labels, pixel_values,
                                         with_entropy=True, temperature=self.temperature)
        values = self.critic.head(hidden[:, :-1].to(self.critic.head.weight.dtype)).squeeze(-1).float()
        return lp, ent, values
