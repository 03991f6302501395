"""Preference data and the model pieces the reward / dpo / ppo stages share.

A preference record is TRL's layout: `{"image", "prompt", "chosen", "rejected"}`, where `prompt` is a string
or a list of chat messages (multi-turn allowed; `<image>` marks the image) and `chosen` / `rejected` are a
string or a one-message assistant list. Each side encodes as prompt + response with labels on the response
only (earlier assistant turns of the prompt are context, not targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import UserError
from .data import Collator, Encoder, Example, _where, check_image, image_paths, read_records


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: Example  # the prompt alone, encoded for generation (PPO rollouts)
    meta: dict = field(default_factory=dict)


def _messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"empty '{what}'")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a string or a list of messages")
    msgs = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "user", "assistant", "system"):
            raise ValueError(f"'{what}': a message needs a role (user / assistant / system) and string content")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def response_only(labels: list[int]) -> list[int]:
    """Keep the labels of the last labelled run (the response); earlier assistant turns become context."""
    out, i = [-100] * len(labels), len(labels) - 1
    while i >= 0 and labels[i] == -100:
        i -= 1
    while i >= 0 and labels[i] != -100:
        out[i] = labels[i]
        i -= 1
    return out


def parse_pair(rec, root: Path, enc: Encoder) -> Pair:
    if isinstance(rec, ValueError):
        raise rec
    if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
        raise ValueError("a preference record needs 'prompt', 'chosen' and 'rejected'")
    prompt = _messages(rec["prompt"], "user", "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError("'prompt' must end with a user turn")
    imgs = image_paths(rec, root)
    for img in imgs:
        check_image(img)
    sides = []
    for key in ("chosen", "rejected"):
        resp = _messages(rec[key], "assistant", key)
        if len(resp) != 1 or resp[0]["role"] != "assistant" or not resp[0]["content"].strip():
            raise ValueError(f"'{key}' must be one non-empty assistant answer")
        ids, labels = enc.encode(prompt + resp, len(imgs))
        sides.append(Example(ids, response_only(labels), imgs))
    p_ids, p_labels = enc.encode(prompt, len(imgs), for_generation=True)
    meta = {k: rec[k] for k in ("id", "type") if k in rec}
    meta["answer"] = _messages(rec["chosen"], "assistant", "chosen")[0]["content"]
    return Pair(sides[0], sides[1], Example(p_ids, p_labels, imgs), meta)


def load_pairs(path: str | Path, enc: Encoder, on_error: str = "fail",
               columns: dict | None = None) -> tuple[list[Pair], list[str]]:
    """Encode every preference record of a data source (JSON / JSONL, parquet, `datasets` folder; TRL's standard
    or conversational columns, renamed by `data.columns`); bad records fail or are skipped, as for sft."""
    from .formats import preference_record, rename_columns
    if on_error not in ("fail", "skip"):
        raise UserError(f"data.on_error must be fail or skip, got '{on_error}'")
    p = Path(path)
    root = p if p.is_dir() else p.parent
    pairs, skipped = [], []
    for line, rec in read_records(p):
        try:
            if isinstance(rec, ValueError):
                raise rec
            pair = parse_pair(preference_record(rename_columns(rec, columns)), root, enc)
        except ValueError as e:
            if on_error == "fail":
                raise UserError(f"{_where(p, line)}: {e}") from None
            skipped.append(f"{_where(p, line)}: {e}")
            continue
        pair.meta["where"] = _where(p, line)
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{p}: no usable preference record")
    return pairs, skipped


class PreferenceCollator:
    """A batch of B pairs as 2B rows: the chosen sides first, then the rejected ones (one forward pass).

    Pairs that carry reference log-probs (`meta["ref"] = (chosen, rejected)`) add `ref_logps` (2B,).
    """

    def __init__(self, collate: Collator):
        self.collate = collate

    def __call__(self, pairs: list[Pair]) -> dict:
        batch = self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
        if all("ref" in p.meta for p in pairs):
            batch["ref_logps"] = torch.tensor([p.meta["ref"][0] for p in pairs] + [p.meta["ref"][1] for p in pairs])
        return batch


# ------------------------------------------------------------------------------------------ model pieces
def token_logps(model, input_ids, attention_mask, labels, pixel_values=None, with_entropy: bool = False,
                temperature: float = 1.0):
    """Log-prob of every labelled token under the model: (logps, mask[, entropy, hidden]), each (B, T-1).

    Position t holds token t+1 (the next-token layout); logits are computed only where a label is. With a
    temperature, the log-probs are those of the tempered distribution the tokens were sampled from (PPO).
    """
    from .losses import entropy_from_logits
    hidden = model.hidden_states(input_ids, attention_mask, pixel_values)
    y = labels[:, 1:]
    mask = y != -100
    logits = model.logits_at(hidden[:, :-1][mask]).float() / temperature
    logps = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    logps[mask] = torch.log_softmax(logits, -1).gather(-1, y[mask].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps, mask
    ent = torch.zeros_like(logps)
    ent[mask] = entropy_from_logits(logits)
    return logps, mask, ent, hidden


def last_token_index(labels: torch.Tensor) -> torch.Tensor:
    """Index of the last labelled token of each row (the end of the response)."""
    has = labels != -100
    return labels.shape[1] - 1 - has.flip(-1).int().argmax(-1)


class ScalarHead(nn.Module):
    """The LMM with a linear head giving one number per position; used as reward model and as PPO critic."""

    def __init__(self, lmm, init_std: float | None = None):
        super().__init__()
        self.lmm = lmm
        dim = lmm.spec["llm_dim"]
        self.head = nn.Linear(dim, 1)
        if init_std is not None:
            nn.init.normal_(self.head.weight, std=init_std)
            nn.init.zeros_(self.head.bias)
        self.head.to(next(lmm.connector.parameters()).dtype)  # the LLM's weights may be 4-bit integers (qlora)

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


def pair_batches(pairs: list[Pair], collate, batch_size: int, device):
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        yield chunk, {k: v.to(device) for k, v in collate(chunk).items()}


@torch.no_grad()
def policy_logps(model, pairs: list[Pair], collate, batch_size: int = 32) -> torch.Tensor:
    """Summed response log-probs of every pair under a model: (N, 2) = (chosen, rejected)."""
    was = model.training
    model.eval()
    out = []
    for chunk, b in pair_batches(pairs, collate, batch_size, model.device):
        lp, mask = token_logps(model, b["input_ids"], b["attention_mask"], b["labels"], b.get("pixel_values"))
        s = (lp * mask).sum(-1).cpu()
        out.append(torch.stack([s[:len(chunk)], s[len(chunk):]], -1))
    model.train(was)
    return torch.cat(out)


def build_policy(cfg):
    """The recipe's model with its trainable parts set (peft.method / train.parts, as for sft), and its encoder."""
    from .model import build_model, resolve_dtype
    from .sft import configure_trainable, quantization_config
    torch.manual_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_model(cfg.model, dtype=dtype, quantization_config=quantization_config(cfg, dtype))
    configure_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.base_llm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_llm().config.use_cache = False
    enc = Encoder(model.tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.system_prompt)
    return model, enc


def collator_for(model) -> PreferenceCollator:
    from .data import ImageLoader
    return PreferenceCollator(Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor)))
