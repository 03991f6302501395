"""Data: LLaVA-style conversation records, chat-template encoding with assistant-only labels, images, collators.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` (LLaVA)
or the same with `"messages": [{"role", "content"}]`, where content may be OpenAI-style parts
(`{"type": "text", "text"}` and `{"type": "image"}`); `<image>` marks where the image goes. JSON (a list) and
JSONL files are read here, parquet, `datasets` folders and hub ids through `formats`. Images are paths
(relative to the data file, or `image_root`, and not leaving it), bytes or PIL images.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import IMAGE_TOKEN, UserError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image held in memory (parquet and `datasets` rows), named for messages and caching."""
    data: bytes = field(repr=False)
    name: str

    def __str__(self) -> str:
        return self.name


def _image_file(p):
    return io.BytesIO(p.data) if isinstance(p, ImageBytes) else p


def read_records(path: str | Path) -> list[tuple[int, dict | ValueError]]:
    """(line or index, record) pairs from a JSON list or a JSONL file; a broken JSONL line is a ValueError."""
    from .formats import is_hub_id, is_table, table_records
    if is_table(path) or is_hub_id(str(path)):
        return table_records(path)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    raw = p.read_bytes()
    if p.suffix == ".json" or raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"{p}: not UTF-8 text at line {line}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: a JSON data file must hold a list of records")
        return list(enumerate(data, 1))
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            out.append((i, ValueError("not UTF-8 text")))
        except json.JSONDecodeError as e:
            out.append((i, ValueError(f"malformed JSON: {e.msg}")))
    return out


def content_text(content, role: str) -> str:
    """A turn's text: a string, or OpenAI-style parts joined by newlines, an image part becoming `<image>`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ValueError(f"{role} turn text is not a string or a list of parts: {content!r}"[:120])
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image", "image_url"):
            parts.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"unknown content part {part!r}"[:120])
    return "\n".join(parts)


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
        if isinstance(content, list):
            content = content_text(content, role)
        if not isinstance(content, str):
            raise ValueError(f"turn text is not a string: {content!r}"[:120])
        if role == "assistant" and not content.strip():
            raise ValueError(f"empty assistant turn (turn {len(msgs) + 1})")
        msgs.append({"role": role, "content": content})
    return msgs


def _in_memory(n) -> ImageBytes | None:
    """Bytes, a `{"bytes", "path"}` struct (parquet / datasets) or a PIL image as ImageBytes; None for a path."""
    if isinstance(n, dict) and set(n) <= {"bytes", "path"}:
        if n.get("bytes") is None:
            return None
        name, n = n.get("path") or "image", n["bytes"]
    elif hasattr(n, "save") and hasattr(n, "mode"):  # a PIL image: kept losslessly as PNG
        buf = io.BytesIO()
        n.save(buf, format="PNG")
        name, n = "PIL image", buf.getvalue()
    elif isinstance(n, (bytes, bytearray)):
        name = "image"
    else:
        return None
    return ImageBytes(bytes(n), f"{name} (in-memory, sha1 {hashlib.sha1(n).hexdigest()[:10]})")


def image_paths(record: dict, root: Path) -> list:
    """The record's images: Paths inside root, or ImageBytes for images held in the data itself."""
    img = record.get("image", record.get("images"))
    if img is None:
        return []
    names = img if isinstance(img, list) else [img]
    out = []
    for n in names:
        held = n if isinstance(n, ImageBytes) else _in_memory(n)
        if held is not None:
            out.append(held)
            continue
        if isinstance(n, dict) and isinstance(n.get("path"), str):
            n = n["path"]
        if not isinstance(n, str) or not n:
            raise ValueError(f"image path is not a string: {n!r}")
        p = (root / n).resolve()
        if not p.is_relative_to(root.resolve()):
            raise ValueError(f"image path escapes the data folder: {n}")
        out.append(p)
    return out


MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused: a decompression bomb costs GBs of memory


def check_image(p: Path, decode: bool = False) -> None:
    """Raise ValueError for a missing, unreadable, empty or enormous image (header only unless decode)."""
    from PIL import Image
    try:
        with Image.open(_image_file(p)) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {w}x{h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit: {p}")
            if decode:
                im.load()
    except FileNotFoundError:
        raise ValueError(f"image not found: {p}") from None
    except Image.DecompressionBombError:
        raise ValueError(f"image is over the decompression-bomb limit: {p}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {p}: {e}") from None
    if w == 0 or h == 0:
        raise ValueError(f"image has zero size: {p}")


def open_rgb(p: Path):
    """An RGB image from any PIL mode: transparency over white, 16-bit and float scaled to 8 bits."""
    import numpy as np
    from PIL import Image
    with Image.open(_image_file(p)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(im, dtype=np.float32)
            a = (a - a.min()) * (255.0 / max(float(a.max() - a.min()), 1e-6))
            im = Image.fromarray(a.astype(np.uint8), "L")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA"):
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im.convert("RGBA"))
        return im.convert("RGB")


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


def parse_record(rec, root: Path, encoder: Encoder | None, for_generation: bool = False,
                 decode_images: bool = False) -> Example:
    """One record as an Example; raises ValueError naming what is wrong with it."""
    if isinstance(rec, ValueError):
        raise rec
    msgs = messages_of(rec)
    imgs = image_paths(rec, root)
    for img in imgs:
        check_image(img, decode=decode_images)
    if encoder is None:  # structure only: no tokenizer to encode with
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
        if placeholders != len(imgs):
            raise ValueError(f"{placeholders} '<image>' placeholder(s) for {len(imgs)} image(s)")
        return Example([], [], imgs, {})
    ids, labels = encoder.encode(msgs, len(imgs), for_generation)
    meta = {k: rec[k] for k in ("id", "type", "answer") if k in rec}
    if for_generation:
        meta["messages"] = msgs
    return Example(ids, labels, imgs, meta)


def _where(p: Path, line: int) -> str:
    if p.suffix == ".jsonl" or (p.is_file() and p.suffix not in (".json", ".parquet")):
        return f"{p}:{line}"
    return f"{p} record {line}" if p.suffix == ".json" else f"{p} row {line}"


def load_examples(path: str | Path, encoder: Encoder, on_error: str = "fail", for_generation: bool = False,
                  image_root: str | Path | None = None, columns: dict | None = None) -> tuple[list[Example], list[str]]:
    """Encode every record of a file; returns the examples and, with on_error=skip, what was skipped."""
    if on_error not in ("fail", "skip"):
        raise UserError(f"data.on_error must be fail or skip, got '{on_error}'")
    from .formats import rename_columns
    p = Path(path)
    root = Path(image_root) if image_root else p if p.is_dir() else p.parent
    examples, skipped = [], []
    for line, rec in read_records(path):
        try:
            ex = parse_record(rename_columns(rec, columns), root, encoder, for_generation)
        except ValueError as e:
            if on_error == "fail":
                raise UserError(f"{_where(p, line)}: {e}") from None
            skipped.append(f"{_where(p, line)}: {e}")
            continue
        ex.meta["where"] = _where(p, line)
        examples.append(ex)
    if not examples:
        raise UserError(f"{p}: no usable record")
    return examples, skipped


def validate(path: str | Path, encoder: Encoder | None = None, columns: dict | None = None) -> tuple[int, list[str]]:
    """Every problem of a data set at once (images fully decoded): (records, problems)."""
    from .formats import rename_columns
    p = Path(path)
    problems, n = [], 0
    for line, rec in read_records(path):
        n += 1
        try:
            parse_record(rename_columns(rec, columns), p if p.is_dir() else p.parent, encoder, decode_images=True)
        except ValueError as e:
            problems.append(f"{_where(p, line)}: {e}")
    return n, problems


class ImageLoader:
    """Opens, converts and pre-processes images; keeps small results in memory (a byte budget)."""

    def __init__(self, processor, cache_bytes: int = 512 << 20):
        self.processor, self.cache, self.budget = processor, {}, cache_bytes

    def __call__(self, paths: list[Path]):
        import torch  # imported here: reading and encoding records must not need torch (the ONNX runner)
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache]
        fresh = {}
        if todo:
            imgs = []
            for p in todo:
                try:
                    imgs.append(open_rgb(p))
                except (OSError, ValueError) as e:
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
        import torch
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
            try:
                out["pixel_values"] = self.images(paths)
            except UserError as e:  # name the record too: an image can break only when it is decoded
                where = next((x.meta.get("where") for x in batch for q in x.images if str(q) in str(e)), None)
                raise UserError(f"{where}: {e}" if where else str(e)) from None
        return out


def encoder_for(cfg) -> Encoder:
    """An Encoder from a recipe's tokenizer and image-token count, without loading any weights."""
    from transformers import AutoConfig, AutoTokenizer

    from .model import _hf_load, prepare_tokenizer
    m = cfg.model
    if m.init_from:
        spec = json.loads((Path(m.init_from) / "tinyml_model.json").read_text())
        llm, n_img = str(Path(m.init_from) / "llm"), spec["num_image_tokens"]
    else:
        if not m.vision:
            raise UserError("model.vision is not set (needed to count image tokens)")
        vcfg = _hf_load(AutoConfig.from_pretrained, m.vision, "vision config", trust_remote_code=m.trust_remote_code)
        vcfg = getattr(vcfg, "vision_config", vcfg)
        llm = m.llm
        n_img = ({"resampler": m.resampler_queries, "qformer": m.qformer_queries}.get(m.connector)
                 or (vcfg.image_size // vcfg.patch_size) ** 2)
    tok = _hf_load(AutoTokenizer.from_pretrained, llm, "tokenizer", trust_remote_code=m.trust_remote_code)
    prepare_tokenizer(tok, None)
    return Encoder(tok, n_img, cfg.data.max_length, cfg.data.system_prompt)
