"""Conversation records: LLaVA / OpenAI-message layouts, images, encoding into Examples, validation.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` (LLaVA)
or the same with `"messages": [{"role", "content"}]`, where content may be OpenAI-style parts
(`{"type": "text", "text"}` and `{"type": "image"}`); `<image>` marks where the image goes. Files are read by
`sources`. Images are paths (relative to the data file, or `image_root`, and not leaving it), bytes or PIL images.
"""


from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from .. import IMAGE_TOKEN, UserError
from .encoder import Encoder
from .sources import check_all, parse_all

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


def image_size(p) -> tuple[int, int]:
    """(width, height) of an image, read from its header."""
    from PIL import Image
    with Image.open(_image_file(p)) as im:
        return im.size


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


def image_exists(p, seen: dict) -> None:
    """The lazy check of an image path (a stat, once per path in `seen`): raise ValueError if it is missing.
    Its header and pixels are read when its batch is made; `data validate` reads them all up front."""
    if isinstance(p, ImageBytes):
        return
    if p not in seen:
        seen[p] = p.is_file()
    if not seen[p]:
        raise ValueError(f"image not found: {p}")


def parse_record(rec, root: Path, encoder: Encoder | None, for_generation: bool = False,
                 decode_images: bool = False, lazy: dict | None = None) -> Example:
    """One record as an Example; raises ValueError naming what is wrong with it. With `lazy` (a dict of the
    paths seen so far) images are checked to exist without being opened, unless the encoder must read their
    size (a processor-based model's image tokens)."""
    if isinstance(rec, ValueError):
        raise rec
    msgs = messages_of(rec)
    imgs = image_paths(rec, root)
    for img in imgs:
        if lazy is not None and (encoder is None or encoder.images is None):
            image_exists(img, lazy)
        else:
            check_image(img, decode=decode_images)
    if encoder is None:  # structure only: the checks the encoder makes that need no tokenizer
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
        if placeholders != len(imgs):
            raise ValueError(f"{placeholders} '<image>' placeholder(s) for {len(imgs)} image(s)")
        if not for_generation and not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant turn to learn from")
        return Example([], [], imgs, {})
    ids, labels = encoder.encode(msgs, imgs, for_generation)
    meta = {k: rec[k] for k in ("id", "type", "answer") if k in rec}
    if for_generation:
        meta["messages"] = msgs
    return Example(ids, labels, imgs, meta)


def load_examples(path: str | Path, encoder: Encoder, on_error: str = "fail", for_generation: bool = False,
                  image_root: str | Path | None = None, columns: dict | None = None) -> tuple[list[Example], list[str]]:
    """Encode every record of a file; returns the examples and, with on_error=skip, what was skipped."""
    p = Path(path)
    root = Path(image_root) if image_root else p if p.is_dir() else p.parent
    return parse_all(path, lambda rec: parse_record(rec, root, encoder, for_generation), on_error, columns)


def validate(path: str | Path, encoder: Encoder | None = None, columns: dict | None = None,
             records: list | None = None) -> tuple[int, list[str]]:
    """Every problem training would find in a conversation data set, at once (images fully decoded):
    (records, problems)."""
    p = Path(path)
    root = p if p.is_dir() else p.parent
    return check_all(path, lambda rec: parse_record(rec, root, encoder, decode_images=True), columns, records=records)


def eval_examples(path: str, enc: Encoder, data) -> list[Example]:
    """Held-out records encoded for generation; each one's answer is its `answer`, else its last assistant turn."""
    examples, _ = load_examples(path, enc, data.on_error, for_generation=True, columns=data.columns)
    for e in examples:
        if "answer" not in e.meta and e.meta["messages"][-1]["role"] == "assistant":
            e.meta["answer"] = e.meta["messages"][-1]["content"]
    return examples


def prompt_example(enc: Encoder, image: str | None, prompt: str):
    """One user prompt, about one image or none, encoded for generation (`<image>` goes first if not placed)."""
    if image and IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n" + prompt
    imgs = []
    if image:
        if not Path(image).is_file():
            raise UserError(f"image not found: {image}")
        imgs = [Path(image)]
    try:
        ids, labels = enc.encode([{"role": "user", "content": prompt}], imgs, for_generation=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    return Example(ids, labels, imgs)
