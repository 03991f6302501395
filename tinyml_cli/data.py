"""Data: LLaVA-style conversation records, chat-template encoding with assistant-only labels, images, collators.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` (LLaVA)
or the same with `"messages": [{"role", "content"}]`; `<image>` marks where the image goes. JSON (a list) and
JSONL files are read; image paths are relative to the data file (or `image_root`) and may not leave it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import UserError
from .model import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    meta: dict = field(default_factory=dict)


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line or index, record) pairs from a JSON list or a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if p.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: a JSON data file must hold a list of records")
        return list(enumerate(data, 1))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{i}: malformed JSON: {e.msg}") from None
    return out


def messages_of(record: dict) -> list[dict]:
    """The record's turns as chat messages `{"role", "content"}`."""
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'conversations' (or 'messages') list")
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            raise ValueError("a turn is not an object")
        role = ROLES.get(t.get("from", t.get("role")))
        content = t.get("value", t.get("content"))
        if role is None:
            raise ValueError(f"unknown speaker {t.get('from', t.get('role'))!r}")
        if not isinstance(content, str):
            raise ValueError(f"turn text is not a string: {content!r}"[:120])
        msgs.append({"role": role, "content": content})
    return msgs


def image_paths(record: dict, root: Path) -> list[Path]:
    img = record.get("image", record.get("images"))
    if img is None:
        return []
    names = img if isinstance(img, list) else [img]
    out = []
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"image path is not a string: {n!r}")
        p = (root / n).resolve()
        if not p.is_relative_to(root.resolve()):
            raise ValueError(f"image path escapes the data folder: {n}")
        out.append(p)
    return out


class Encoder:
    """Turns messages into token ids and labels: only assistant turns are labelled, image tokens never."""

    def __init__(self, tokenizer, num_image_tokens: int, max_length: int, system_prompt: str = ""):
        self.tok, self.n_img, self.max_length, self.system = tokenizer, num_image_tokens, max_length, system_prompt
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def _render(self, msgs, gen_prompt: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    def _ids(self, text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += [self.image_id] * self.n_img
            if piece:
                ids += self.tok(piece, add_special_tokens=False)["input_ids"]
        return ids

    def encode(self, msgs: list[dict], n_images: int, for_generation: bool = False) -> tuple[list[int], list[int]]:
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
        if placeholders != n_images:
            raise ValueError(f"{placeholders} '<image>' placeholder(s) for {n_images} image(s)")
        if self.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system}] + msgs
        if for_generation and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        ids, labels, done = [], [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or for_generation:
                continue
            if not m["content"].strip():
                raise ValueError(f"empty assistant turn (turn {i + 1})")
            prompt = self._render(msgs[:i], True)
            full = self._render(msgs[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError("the tokenizer's chat template does not render conversations prefix by prefix")
            p_ids, a_ids = self._ids(prompt[len(done):]), self._ids(full[len(prompt):])
            ids += p_ids + a_ids
            labels += [-100] * len(p_ids) + [t if t != self.image_id else -100 for t in a_ids]
            done = full
        if for_generation:
            ids = self._ids(self._render(msgs, True))
            labels = [-100] * len(ids)
        elif not ids:
            raise ValueError("no assistant turn to learn from")
        return self._truncate(ids, labels, for_generation)

    def _truncate(self, ids, labels, for_generation):
        if len(ids) <= self.max_length:
            return ids, labels
        if for_generation:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than data.max_length={self.max_length}")
        # Cutting into the image tokens would leave a record whose image no longer matches its tokens:
        # other toolkits corrupt such records silently, here it is an error.
        img_pos = [i for i, t in enumerate(ids) if t == self.image_id]
        if img_pos and img_pos[-1] >= self.max_length:
            raise ValueError(f"image tokens end at {img_pos[-1] + 1} > data.max_length={self.max_length}")
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(x == -100 for x in labels[1:]):
            raise ValueError(f"no assistant token left after truncation to data.max_length={self.max_length}")
        return ids, labels


def load_examples(path: str | Path, encoder: Encoder, on_error: str = "fail", for_generation: bool = False,
                  image_root: str | Path | None = None) -> tuple[list[Example], list[str]]:
    """Encode every record of a file; returns the examples and, with on_error=skip, what was skipped."""
    if on_error not in ("fail", "skip"):
        raise UserError(f"data.on_error must be fail or skip, got '{on_error}'")
    p = Path(path)
    root = Path(image_root) if image_root else p.parent
    examples, skipped = [], []
    for line, rec in read_records(p):
        try:
            msgs = messages_of(rec)
            imgs = image_paths(rec, root)
            ids, labels = encoder.encode(msgs, len(imgs), for_generation)
            meta = {k: rec[k] for k in ("id", "type", "answer") if k in rec}
            if for_generation:
                meta["messages"] = msgs
            examples.append(Example(ids, labels, imgs, meta))
        except ValueError as e:
            where = f"{p}:{line}" if p.suffix != ".json" else f"{p} record {line}"
            if on_error == "fail":
                raise UserError(f"{where}: {e}") from None
            skipped.append(f"{where}: {e}")
    if not examples:
        raise UserError(f"{p}: no usable record")
    return examples, skipped


class ImageLoader:
    """Opens, converts and pre-processes images; keeps small results in memory (a byte budget)."""

    def __init__(self, processor, cache_bytes: int = 512 << 20):
        self.processor, self.cache, self.budget = processor, {}, cache_bytes

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache]
        fresh = {}
        if todo:
            from PIL import Image
            imgs = []
            for p in todo:
                try:
                    with Image.open(p) as im:
                        imgs.append(im.convert("RGB"))
                except FileNotFoundError:
                    raise UserError(f"image not found: {p}") from None
                except OSError as e:
                    raise UserError(f"cannot read image {p}: {e}") from None
            fresh = dict(zip(todo, self.processor(images=imgs, return_tensors="pt")["pixel_values"]))
            for p, x in fresh.items():
                size = x.numel() * x.element_size()
                if size <= self.budget:
                    self.budget -= size
                    self.cache[p] = x
        return torch.stack([self.cache.get(p, fresh.get(p)) for p in paths])


class Collator:
    """Pads a list of Examples into a batch (right padding to train, left padding to generate)."""

    def __init__(self, pad_id: int, images: ImageLoader, left_pad: bool = False):
        self.pad_id, self.images, self.left = pad_id, images, left_pad

    def __call__(self, batch: list[Example]) -> dict:
        n = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            k = len(e.input_ids)
            sl = slice(n - k, n) if self.left else slice(0, k)
            ids[i, sl] = torch.tensor(e.input_ids)
            labels[i, sl] = torch.tensor(e.labels)
            mask[i, sl] = 1
        paths = [p for e in batch for p in e.images]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if paths:
            out["pixel_values"] = self.images(paths)
        return out
