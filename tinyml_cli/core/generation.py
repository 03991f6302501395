"""Generation with the PyTorch model: batched answers to encoded prompts, held-out evaluation, one prompt, and
one prompt's tokens streamed as they are decoded (chat, serve)."""

from __future__ import annotations

from ..records.conversations import eval_examples, prompt_example
from ..records.encoder import encoder_for
from ..records.length_order import in_length_order
from ..records.scoring import prediction_rows, score


def generated_tokens(model, examples: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     batch_size: int = 64, progress=None) -> list[list[int]]:
    """New tokens of each encoded prompt, up to and including the end-of-sequence token."""
    import torch

    model.eval()
    collate = model.collator(left_pad=True)
    eos = model.tokenizer.eos_token_id

    def run(batch_examples):
        batch = {k: v.to(model.device) for k, v in collate(batch_examples).items()}
        batch.pop("labels")
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        return [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in new.tolist()]
    return in_length_order(examples, batch_size, run, progress)


class _TokenStreamer:
    """transformers' streamer protocol: `put` gets the prompt first (a 2-d tensor, ignored), then each step's new
    token (1-d, one row here), which goes to `on_token`."""

    def __init__(self, on_token):
        self.on_token = on_token

    def put(self, value) -> None:
        if value.dim() == 1:
            self.on_token(int(value[0]))

    def end(self) -> None:
        pass


def stream_tokens(model, example, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  on_token=None) -> list[int]:
    """New tokens of one encoded prompt (up to and including the end-of-sequence token), each handed to
    `on_token` as soon as it is decoded; the same tokens `generated_tokens` gives for it alone."""
    import torch

    from .batching import Collator, ImageLoader
    model.eval()
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor, cache_bytes=0), left_pad=True)
    batch = {k: v.to(model.device) for k, v in collate([example]).items()}
    batch.pop("labels")
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        seq = model.generate(**batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             streamer=_TokenStreamer(on_token) if on_token else None)[0].tolist()
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def answers_for(model, examples: list, gen, progress=None) -> list[str]:
    """Decoded answers (special tokens removed) for encoded generation prompts, under a recipe's `gen` section."""
    tokens = generated_tokens(model, examples, gen.max_new_tokens, gen.temperature, gen.top_p, gen.batch_size, progress)
    return [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def evaluate_model(model, path: str, cfg, progress=None) -> tuple[dict, list[dict]]:
    """(metrics, prediction rows) of a loaded model on a held-out file."""
    examples = eval_examples(path, encoder_for(model, cfg.data), cfg.data)
    preds = answers_for(model, examples, cfg.gen, progress)
    return score(examples, preds), prediction_rows(examples, preds)


def answer_prompt(model, image: str | None, prompt: str, cfg) -> tuple[str, int]:
    """A loaded model's answer to one prompt (about one image or none), and the prompt's token count."""
    example = prompt_example(encoder_for(model, cfg.data), image, prompt)
    return answers_for(model, [example], cfg.gen)[0], len(example.input_ids)
