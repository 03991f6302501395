"""Batching: images opened and pre-processed (with a small cache), records padded into batches, preference
pairs as 2B rows, and a recipe's encoder made without loading weights."""


from __future__ import annotations

from pathlib import Path

import torch

from .. import UserError
from ..records.conversations import Example, open_rgb
from ..records.preferences import Pair


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
    """Pads a list of Examples into a batch (right padding to train, left padding to generate), or with `pack`
    (data.packing) lays them end to end in one row with no padding: positions restart at each record (the model
    keeps each record's attention to itself from them) and no record's first token is a target, so the loss is
    that of the padded batch."""

    pack = False

    def __init__(self, pad_id: int, images: ImageLoader, left_pad: bool = False):
        self.pad_id, self.images, self.left = pad_id, images, left_pad

    def packed(self, batch: list[Example]) -> dict:
        import torch
        ids = torch.tensor([t for e in batch for t in e.input_ids])[None]
        labels = torch.tensor([-100 if k == 0 else t for e in batch for k, t in enumerate(e.labels)])[None]
        pos = torch.cat([torch.arange(len(e.input_ids)) for e in batch])[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "position_ids": pos}

    def __call__(self, batch: list[Example]) -> dict:
        import torch
        if self.pack:
            out = self.packed(batch)
            if any(e.images for e in batch):
                out["pixel_values"] = self.pixels(batch, out["input_ids"], out["labels"])
            return out
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
                out["pixel_values"] = self.pixels(batch, ids, labels)
            except UserError as e:  # name the record too: an image can break only when it is decoded
                where = next((x.meta.get("where") for x in batch for q in x.images if str(q) in str(e)), None)
                raise UserError(f"{where}: {e}" if where else str(e)) from None
        return out

    def pixels(self, batch: list[Example], ids, labels):
        """The batch's image input (a processor-based model's collator returns its family's tensors here)."""
        return self.images([p for e in batch for p in e.images])


def crop_resized(pixel_values: torch.Tensor, boxes: list) -> torch.Tensor:
    """Each image cut to its box (top, left, height, width as fractions of the image) and resized back (bilinear):
    mDPO's corrupted image. Works on processed pixels: cropping and resizing commute with the per-channel
    normalisation, as both are affine."""
    import torch.nn.functional as F
    _, _, H, W = pixel_values.shape
    out = []
    for x, (top, left, h, w) in zip(pixel_values, boxes):
        t, l_ = min(int(top * H), H - 1), min(int(left * W), W - 1)
        h, w = max(1, min(round(h * H), H - t)), max(1, min(round(w * W), W - l_))
        out.append(F.interpolate(x[None, :, t:t + h, l_:l_ + w], size=(H, W), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


class PreferenceCollator:
    """A batch of B pairs as 2B rows: the chosen sides first, then the rejected ones (one forward pass).

    Pairs that carry a crop box (`meta["crop"]`, mDPO) add B rows: the chosen side again, with its image cropped
    (`crop_resized`). Pairs that carry reference log-probs (`meta["ref"]`, one per side) add `ref_logps`.
    """

    def __init__(self, collate: Collator):
        self.collate = collate

    def __call__(self, pairs: list[Pair]) -> dict:
        crops = all("crop" in p.meta for p in pairs)
        batch = self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs] + ([p.chosen for p in pairs] if crops else []))
        if crops:
            n = len(pairs)
            pix = batch["pixel_values"]
            batch["pixel_values"] = torch.cat([pix[:2 * n], crop_resized(pix[:n], [p.meta["crop"] for p in pairs])])
        if all("ref" in p.meta for p in pairs):
            batch["ref_logps"] = torch.tensor([p.meta["ref"][k] for k in range(len(pairs[0].meta["ref"])) for p in pairs])
        return batch


def pair_batches(pairs: list[Pair], collate, batch_size: int, device):
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        yield chunk, {k: v.to(device) for k, v in collate(chunk).items()}


def collator_for(model) -> PreferenceCollator:
    return PreferenceCollator(model.collator())


# ------------------------------------------------------------------ processor-based models (core/hf_vlm.py)
def process_images(processor, images: list[list]):
    """(image tensors, what each image's placeholder becomes) for images grouped by record, through the
    processor's own image path with its default settings (what `processor(text, images)` does for images)."""
    import inspect
    kw = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs, return_tensors="pt")
    takes = inspect.signature(processor._process_images).parameters  # LFM2-VL's also takes its own settings
    extra = {k: v for k, v in kw.items() if k in takes and not k.endswith("_kwargs")}
    return processor._process_images(images, **kw["images_kwargs"], **extra)


def token_types(family: str, processor, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """The per-token inputs some families' forward takes beside the ids: Qwen's `mm_token_type_ids` (for M-RoPE),
    Gemma 3's `token_type_ids` (image tokens attend to each other both ways), PaliGemma's `token_type_ids`
    (0: the prefix, attended both ways; 1: the answer, the suffix)."""
    names = processor.model_input_names
    if family == "paligemma":
        return {"token_type_ids": (labels != -100).long()}
    out = {}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in names:
            out[key] = torch.tensor(processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long)
    return out


class VisionInputs(dict):
    """A batch's image tensors and the family's extras, carried under one key (`pixel_values`) so that every
    stage moves and passes them as it does the composed model's pixel tensor."""

    def to(self, device):
        return VisionInputs({k: v.to(device) for k, v in self.items()})

    def detach(self):
        return VisionInputs({k: v.detach() for k, v in self.items()})

    def cpu(self):
        return self.to("cpu")


class ProcessorCollator(Collator):
    """Pads records like `Collator`; images go through the family's processor (a `model.vlm` checkpoint), whose
    tensors and the family's per-token inputs travel together as `pixel_values` (a `VisionInputs`)."""

    def __init__(self, processor, family: str, forward_inputs: set, left_pad: bool = False):
        super().__init__(processor.tokenizer.pad_token_id, None, left_pad)
        self.processor, self.family, self.forward_inputs = processor, family, forward_inputs

    def pixels(self, batch, ids, labels):
        images = []
        for e in batch:
            row = []
            for p in e.images:
                try:
                    row.append(open_rgb(p))
                except (OSError, ValueError) as err:
                    raise UserError(f"cannot read image {p}: {err}") from None
            images.append(row)
        out, _ = process_images(self.processor, images)
        inputs = VisionInputs({k: v for k, v in out.items() if k in self.forward_inputs and torch.is_tensor(v)})
        inputs.update(token_types(self.family, self.processor, ids, labels))
        return inputs


# ------------------------------------------------------------------ training records
def train_examples(data, encoder, status=None) -> tuple:
    """A recipe's training conversations, encoded: (examples, skipped records' problems). A JSON / JSONL file
    goes through the on-disk cache (`records.encoded`): in a multi-process run rank 0 encodes and the others then
    read its entry (or, if it failed, meet the same error themselves); other sources are encoded in memory."""
    from ..records.conversations import load_examples
    from ..records.encoded import cacheable, default_cache_dir, encode_cached
    status = status or (lambda text: None)
    if not cacheable(data.train):
        status(f"reading and encoding {data.train}")
        examples, skipped = load_examples(data.train, encoder, data.on_error, columns=data.columns)
        status(f"{len(examples):,} records encoded{f', {len(skipped)} skipped' if skipped else ''}")
        return examples, skipped
    from .loop import process_state
    state = process_state()
    others_wait = state.num_processes > 1
    if others_wait and not state.is_main_process:
        state.wait_for_everyone()
    try:
        status(f"reading and encoding {data.train}")
        examples, skipped, hit = encode_cached(
            data.train, encoder, data.cache_dir or default_cache_dir(), data.on_error, data.num_proc, data.columns,
            progress=lambda done, n: status(f"encoding {data.train}: {done}/{n} blocks"))
    finally:
        if others_wait and state.is_main_process:
            state.wait_for_everyone()
    status(f"{len(examples):,} records {'from the cache' if hit else 'encoded'} ({examples.folder})"
           f"{f', {len(skipped)} skipped' if skipped else ''}")
    return examples, skipped
