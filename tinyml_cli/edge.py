"""The edge flow: export -> ONNX greedy parity -> int4 -> eval -> hf-llava logits, as demo metrics."""

from __future__ import annotations

from pathlib import Path


def torch_greedy_tokens(model, examples: list, max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """PyTorch greedy tokens of each prompt (as `evaluate.answers_for` makes them), up to and including EOS."""
    import torch

    from .data import Collator, ImageLoader
    model.eval()
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=True)
    eos = model.tokenizer.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    found = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[i] for i in idx])
        batch.pop("labels")
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=max_new_tokens)
        for i, seq in zip(idx, new.tolist()):
            found[i] = seq[:seq.index(eos) + 1] if eos in seq else seq
    return [found[i] for i in range(len(examples))]
