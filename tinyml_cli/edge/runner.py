"""Run a `tinyml export` ONNX folder with onnxruntime alone: no torch, no transformers.

The pre-processing is the PyTorch path's own: records are read and encoded by `records.encoder.Encoder` (chat template,
`<image>` expanded to the image tokens, the same checks), given a tokenizer made here from `tokenizer.json`
(`tokenizers`) and the chat template (rendered with jinja2 the way transformers renders it); images go
through `records.conversations.open_rgb` and the saved image processor's resize / rescale / normalize, done in numpy and PIL.
Generation is greedy (or sampled) over the decoder's KV cache, with left padding and position ids as
transformers' `generate` makes them, so that greedy tokens equal the PyTorch model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import UserError
from ..records.length_order import in_length_order

META = "tinyml_onnx.json"


def onnx_sizes(folder: str | Path) -> dict:
    """Bytes of each graph (with its external data file, if any) and their total."""
    folder = Path(folder)
    sizes = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".onnx" or f.name.endswith(".onnx.data"):
            key = f.name.split(".onnx")[0]
            sizes[key] = sizes.get(key, 0) + f.stat().st_size
    sizes["total"] = sum(sizes.values())
    return sizes


def _generation_tag():
    """A jinja extension reading `{% generation %}...{% endgeneration %}` as its body alone.

    transformers' templates may mark assistant text with it (for assistant-token masks, e.g. TRL's
    `assistant_only_loss`); the marks change nothing in the rendered text.
    """
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return Generation


class ChatTokenizer:
    """The few tokenizer methods `records.encoder.Encoder` and decoding use, from tokenizer.json and the chat template."""

    def __init__(self, folder: Path):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # A tokenizer.json keeps the padding / truncation of the last batch call before it was saved (the tiny
        # default's pads every text to 32 tokens); transformers resets both on each call, and so must we.
        self.tok.no_padding()
        self.tok.no_truncation()
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = folder / "chat_template.jinja"
        source = template.read_text() if template.is_file() else cfg.get("chat_template")
        if not source:
            raise UserError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")
        # transformers renders chat templates in this environment (trim_blocks, lstrip_blocks, sandboxed)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag()])
        self.template = env.from_string(source)
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        self.special = {k: name(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.pad_token_id = self.convert_tokens_to_ids(self.special["pad_token"]) if self.special["pad_token"] else None
        self.eos_token_id = self.convert_tokens_to_ids(self.special["eos_token"]) if self.special["eos_token"] else None

    def convert_tokens_to_ids(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise UserError(f"token {token!r} is not in the exported tokenizer")
        return i

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict:
        """Token ids of a text, or of each text of a list (as a transformers tokenizer's call)."""
        if isinstance(text, list):
            return {"input_ids": [e.ids for e in self.tok.encode_batch(text, add_special_tokens=add_special_tokens)]}
        return {"input_ids": self.tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class ImageProcessor:
    """Resize / rescale / normalize from a saved preprocessor_config.json (SigLIP and CLIP processors)."""

    def __init__(self, cfg: dict):
        from PIL import Image
        self.cfg = cfg
        self.resample = Image.Resampling(cfg.get("resample", 3))
        size = cfg.get("size", {})
        if cfg.get("do_resize", True) and not ({"height", "width"} <= set(size) or "shortest_edge" in size):
            raise UserError(f"image processor size {size} is not supported by the ONNX runner")

    def __call__(self, images) -> np.ndarray:
        return np.stack([self.one(im) for im in images])

    def one(self, im) -> np.ndarray:
        c = self.cfg
        if c.get("do_resize", True):
            size = c["size"]
            if "shortest_edge" in size:  # CLIP: shortest edge to the size, then a centre crop
                e, (w, h) = size["shortest_edge"], im.size
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(e * long / short)
                im = im.resize((e, new_long) if w <= h else (new_long, e), resample=self.resample)
            else:
                im = im.resize((size["width"], size["height"]), resample=self.resample)
        x = np.asarray(im)
        if c.get("do_center_crop"):
            ch, cw = c["crop_size"]["height"], c["crop_size"]["width"]
            top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
            x = x[top:top + ch, left:left + cw]
        x = x.astype(np.float32)
        if c.get("do_rescale", True):
            x = (x.astype(np.float64) * c.get("rescale_factor", 1 / 255)).astype(np.float32)
        if c.get("do_normalize", True):
            x = (x - np.array(c["image_mean"], np.float32)) / np.array(c["image_std"], np.float32)
        return x.transpose(2, 0, 1)


class OnnxLMM:
    """The exported model: encode images, embed, and decode with a KV cache, on onnxruntime."""

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime as ort
        self.folder = folder = Path(folder)
        if not (folder / META).is_file():
            raise UserError(f"not a tinyml ONNX folder (no {META}): {folder}")
        self.meta = json.loads((folder / META).read_text())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {k: ort.InferenceSession(str(folder / f), opts, providers=["CPUExecutionProvider"])
                         for k, f in self.meta["files"].items()}
        self.float = np.float16 if self.meta["dtype"] == "fp16" else np.float32
        self.tokenizer = ChatTokenizer(folder)
        self.image_processor = ImageProcessor(json.loads((folder / "preprocessor_config.json").read_text()))
        self.image_token_id = self.meta["image_token_id"]

    @property
    def num_image_tokens(self) -> int:
        return self.meta["num_image_tokens"]

    def pixel_values(self, paths) -> np.ndarray:
        from ..records.conversations import open_rgb
        try:
            return self.image_processor([open_rgb(p) for p in paths]).astype(self.float)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image: {e}") from None

    def embed(self, ids: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
        is_img = ids == self.image_token_id
        emb = self.sessions["embed"].run(None, {"input_ids": np.where(is_img, 0, ids)})[0]
        if is_img.any():
            img = self.sessions["vision"].run(None, {"pixel_values": pixel_values})[0]
            if img.shape[0] * img.shape[1] != int(is_img.sum()):
                raise ValueError(f"{int(is_img.sum())} image tokens for {img.shape[0]} images of {img.shape[1]} tokens")
            emb[is_img] = img.reshape(-1, img.shape[-1]).astype(emb.dtype)
        return emb

    @property
    def shared_cache(self) -> bool:
        """The model builder's decoder (KV buffers written in place, no position_ids), not torch.onnx's trace."""
        return self.meta.get("kv_cache") == "shared"

    def _empty_past(self, batch: int) -> dict:
        m = self.meta
        return {f"past_key_values.{i}.{kv}": np.zeros((batch, m["kv_heads"], 0, m["head_dim"]), self.float)
                for i in range(m["num_layers"]) for kv in ("key", "value")}

    def prefill_feed(self, ids: list[int], images: list) -> dict:
        """The decoder's inputs for one whole sequence from an empty cache (either cache layout)."""
        x = np.array([ids], np.int64)
        feed = {"inputs_embeds": self.embed(x, self.pixel_values(images) if images else None).astype(self.float),
                "attention_mask": np.ones_like(x), **self._empty_past(1)}
        return feed if self.shared_cache else {**feed, "position_ids": np.arange(x.shape[1])[None]}

    def steps(self, prompts: list[list[int]], images: list[list], max_new_tokens: int = 16,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """Decode step by step: yields each step's next token of every prompt (an array) and which prompts had
        already finished before it (their token is to be ignored)."""
        pad, eos = self.tokenizer.pad_token_id or 0, self.tokenizer.eos_token_id
        paths = [p for imgs in images for p in imgs]
        pixels = self.pixel_values(paths) if paths else None
        cached = self._shared_cache if self.shared_cache else self._grown_cache
        logits = cached(prompts, pixels, pad, max_new_tokens)
        rng = np.random.default_rng(seed)
        done = np.zeros(len(prompts), bool)
        step = next(logits)
        for t in range(max_new_tokens):
            step = step.astype(np.float32)
            step[:, self.image_token_id] = -np.inf  # input only, as in the PyTorch path
            nxt = self._pick(step, temperature, top_p, rng)
            yield nxt, done.copy()
            done |= nxt == eos
            if done.all() or t + 1 == max_new_tokens:
                break
            step = logits.send(np.where(done, pad, nxt))

    def _grown_cache(self, prompts, pixels, pad: int, max_new_tokens: int):
        """The traced decoder's steps: yields each step's last-position logits and is sent the next tokens.
        Prompts left-padded with transformers' position ids, as the PyTorch path generates; each step's cache
        comes back grown by one position and goes in again."""
        b = len(prompts)
        n = max(len(p) for p in prompts)
        ids = np.full((b, n), pad, np.int64)
        mask = np.zeros((b, n), np.int64)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
        emb = self.embed(ids, pixels)
        pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
        past = self._empty_past(b)
        decoder = self.sessions["decoder"]
        while True:
            logits, *present = decoder.run(None, {"inputs_embeds": emb.astype(self.float), "attention_mask": mask,
                                                  "position_ids": pos, **past})
            nxt = yield logits[:, -1]
            past = dict(zip(past, present))
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
            pos = pos[:, -1:] + 1
            emb = self.embed(nxt[:, None])

    def _shared_cache(self, prompts, pixels, pad: int, max_new_tokens: int):
        """The model builder's decoder's steps, as `_grown_cache`: prompts right-padded, one KV buffer per layer
        with room for the longest prompt and every new token, bound as both past and present so that each step
        writes its token's keys and values in place (at the row's own length: the attention mask's row sum)."""
        import onnxruntime as ort
        m, b = self.meta, len(prompts)
        lens = np.array([len(p) for p in prompts])
        n = int(lens.max())
        ids = np.full((b, n), pad, np.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        mask = (np.arange(n)[None] < lens[:, None]).astype(np.int64)
        emb = self.embed(ids, pixels)
        cache = {f"{i}.{kv}": ort.OrtValue.ortvalue_from_numpy(
            np.zeros((b, m["kv_heads"], n + max_new_tokens, m["head_dim"]), self.float))
            for i in range(m["num_layers"]) for kv in ("key", "value")}
        decoder, last = self.sessions["decoder"], lens - 1  # at the prompt, each row's last real position
        io = decoder.io_binding()
        io.bind_output("logits")  # first, so that it is get_outputs()[0]
        for name, buf in cache.items():  # bound once: every step reads and writes the same buffers
            io.bind_ortvalue_input(f"past_key_values.{name}", buf)
            io.bind_ortvalue_output(f"present.{name}", buf)
        for t in range(max_new_tokens):
            io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(emb, self.float))
            io.bind_cpu_input("attention_mask", mask)
            io.bind_output("logits")  # unallocated again: the run allocates it at this step's shape
            decoder.run_with_iobinding(io)
            nxt = yield io.get_outputs()[0].numpy()[np.arange(b), last]
            last = np.zeros(b, np.int64)
            mask = (np.arange(n + t + 1)[None] < (lens + t + 1)[:, None]).astype(np.int64)
            emb = self.embed(nxt[:, None])

    def generate(self, prompts: list[list[int]], images: list[list], max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        """New tokens of each prompt, up to and including the end-of-sequence token."""
        out: list[list[int]] = [[] for _ in prompts]
        for nxt, finished in self.steps(prompts, images, max_new_tokens, temperature, top_p, seed):
            for i in np.flatnonzero(~finished):
                out[i].append(int(nxt[i]))
        return out

    def stream(self, prompt: list[int], images: list, max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0):
        """The new tokens of one prompt, yielded one at a time as they are decoded (the end-of-sequence token too)."""
        for nxt, _ in self.steps([prompt], [images], max_new_tokens, temperature, top_p, seed):
            yield int(nxt[0])

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> np.ndarray:
        if temperature <= 0:
            return logits.argmax(-1)
        z = logits / temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        picks = []
        for row in p:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-row)
            keep = order[:int(np.searchsorted(np.cumsum(row[order]), top_p)) + 1]
            picks.append(rng.choice(keep, p=row[keep] / row[keep].sum()))
        return np.array(picks)

    def generated_tokens(self, examples: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                         batch_size: int = 64, progress=None) -> list[list[int]]:
        """New tokens of each encoded prompt (`records.Example`s), batched as `core.generation` batches them."""
        def run(batch):
            return self.generate([e.input_ids for e in batch], [e.images for e in batch], max_new_tokens,
                                 temperature, top_p)
        return in_length_order(examples, batch_size, run, progress)

    def answers(self, examples: list, gen, progress=None) -> list[str]:
        """Decoded answers under a recipe's `gen` section, like `core.generation.answers_for`."""
        tokens = self.generated_tokens(examples, gen.max_new_tokens, gen.temperature, gen.top_p, gen.batch_size, progress)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
