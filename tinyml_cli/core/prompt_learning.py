"""Prompt tuning and prefix tuning (peft) on sequences whose image tokens are already embedded.

peft's PromptLearning models prepend their virtual tokens inside their own `forward` / `generate`, which take
token ids; tinyml feeds the LLM input embeddings with the image features spliced in, and peft's `generate`
refuses those. So the model asks peft for the learned prompt (`get_prompt`) and prepends it itself, the way
peft's forward does:
- prompt tuning: the N learned embeddings go before the sequence, the attention mask gets N ones, and the N
  outputs at those positions are dropped, so every label stays on its own token (peft instead pads the labels
  with N -100s; the loss is the same, a test checks it);
- prefix tuning: every layer gets N learned key/value pairs as a pre-filled cache, the mask gets N ones, and
  the real tokens take positions N.. as in peft.
"""

from __future__ import annotations

import torch


def num_virtual_tokens(llm) -> int:
    """N for a prompt-learning peft model, 0 for any other LLM."""
    cfg = getattr(llm, "active_peft_config", None)
    return cfg.num_virtual_tokens if cfg is not None and cfg.is_prompt_learning else 0


def with_virtual_tokens(llm, emb: torch.Tensor, attention_mask: torch.Tensor, generating: bool = False):
    """(inputs_embeds, attention_mask, extra decoder kwargs, outputs to drop at the front) for the base model."""
    n = num_virtual_tokens(llm)
    if not n:
        return emb, attention_mask, {}, 0
    b = emb.shape[0]
    mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
    prompt = llm.get_prompt(b)
    if torch.is_tensor(prompt):  # prompt tuning: learned input embeddings
        return torch.cat([prompt.to(emb.dtype), emb], dim=1), mask, {}, n
    if generating:  # HF generate takes inputs_embeds to cover the cached positions too and runs only the rest
        emb = torch.cat([emb.new_zeros(b, n, emb.shape[-1]), emb], dim=1)
    return emb, mask, {"past_key_values": prompt}, 0  # prefix tuning: a cache of learned keys and values
