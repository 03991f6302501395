"""chat: a multi-turn conversation with a model folder or an ONNX export, its answers streamed as they are decoded.

`Chatbot` is the model side (also what `serve` answers with): a conversation (messages with `<image>` where each
image goes, and the images) -> the reply, its text handed out piece by piece. A tinyml model folder runs on
PyTorch (transformers' generate with a streamer); an ONNX export (`tinyml export`) runs on the edge runner alone,
token by token, and nothing here imports torch for it. Both encode the conversation with the training encoder
(chat template, image tokens), so greedy replies equal `tinyml generate`'s.
`ChatSession` is the terminal conversation: history, `/image PATH`, `/reset`, `/exit`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import IMAGE_TOKEN, UserError
from ..records.conversations import check_image
from ..records.encoder import encoder_for


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)
    seconds: float


class TextStream:
    """Token ids in, new text out: the decoded answer so far is compared with what was already handed out, so that
    multi-byte characters split over tokens come out whole. Leading and trailing whitespace is held back, so the
    pieces add up to exactly the stripped answer that non-streamed generation returns."""

    def __init__(self, tokenizer, on_text=None):
        self.tok, self.on_text, self.ids, self.sent = tokenizer, on_text, [], ""

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return  # half a character, or a decode that rewrote earlier text: wait for more tokens
        if len(text) > len(self.sent) and self.on_text:
            self.on_text(text[len(self.sent):])
        self.sent = text

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True).strip()
        if text.startswith(self.sent) and len(text) > len(self.sent) and self.on_text:
            self.on_text(text[len(self.sent):])
        self.sent = text
        return text


def model_kind(folder: str | Path) -> str:
    """"onnx" for a `tinyml export` folder, "torch" for a tinyml model folder; a user error otherwise."""
    from ..edge.runner import META
    f = Path(folder)
    if (f / META).is_file():
        return "onnx"
    if (f / "tinyml_model.json").is_file():
        return "torch"
    raise UserError(f"not a tinyml model folder nor an ONNX export (no tinyml_model.json, no {META}): {folder}")


class Chatbot:
    """A model folder or an ONNX export that answers conversations."""

    def __init__(self, folder: str | Path, cfg):
        self.folder, self.kind = Path(folder), model_kind(folder)
        if self.kind == "onnx":
            from ..edge.runner import OnnxLMM
            self.model = OnnxLMM(self.folder)
        else:
            from ..core.model import load_model, resolve_dtype
            self.model = load_model(self.folder, dtype=resolve_dtype(cfg.model.dtype),
                                    trust_remote_code=cfg.model.trust_remote_code)
        self.tokenizer = self.model.tokenizer
        self.encoder = encoder_for(self.model, cfg.data)
        self.eos = self.tokenizer.eos_token_id

    def encode(self, messages: list[dict], images: list) -> list[int]:
        """The prompt of a conversation ending with a user turn; a user error if it does not fit data.max_length."""
        try:
            return self.encoder.encode(messages, len(images), for_generation=True)[0]
        except ValueError as e:
            raise UserError(str(e)) from None

    def reply(self, messages: list[dict], images: list, gen, on_text=None, seed: int = 0,
              prompt: list[int] | None = None) -> Reply:
        """The assistant's answer to `messages` (`<image>` in their text where each of `images` goes: paths or
        in-memory images), under a recipe's `gen` section; `on_text(piece)` hears the text as it is decoded."""
        t0 = time.time()
        prompt = prompt if prompt is not None else self.encode(messages, images)
        stream = TextStream(self.tokenizer, on_text)
        if self.kind == "onnx":
            tokens = []
            for t in self.model.stream(prompt, list(images), gen.max_new_tokens, gen.temperature, gen.top_p, seed):
                tokens.append(t)
                stream.add(t)
        else:
            import torch

            from ..core.generation import stream_tokens
            from ..records.conversations import Example
            if gen.temperature > 0:
                torch.manual_seed(seed)
            tokens = stream_tokens(self.model, Example(prompt, [-100] * len(prompt), list(images)),
                                   gen.max_new_tokens, gen.temperature, gen.top_p, on_token=stream.add)
        text = stream.finish()
        finish = "stop" if tokens and tokens[-1] == self.eos else "length"
        return Reply(text, len(prompt), len(tokens), finish, time.time() - t0)


@dataclass
class ChatSession:
    """A terminal conversation: the history, the images attached so far and the one waiting for the next turn."""
    bot: Chatbot
    gen: object
    messages: list = field(default_factory=list)
    images: list = field(default_factory=list)
    pending: list = field(default_factory=list)

    def attach(self, path: str) -> str:
        p = Path(path.strip().strip("'\"")).expanduser()
        try:
            check_image(p, decode=True)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.pending.append(p)
        return f"attached {p} (it goes with your next message)"

    def reset(self) -> str:
        self.messages, self.images, self.pending = [], [], []
        return "conversation cleared"

    def command(self, line: str) -> str | None:
        """A /command: the note to show, or None for /exit."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            return None
        if name == "/reset":
            return self.reset()
        if name == "/image":
            if not arg.strip():
                raise UserError("/image takes a path: /image runs/shapes/images/000000.png")
            return self.attach(arg)
        raise UserError(f"unknown command {name}: /image PATH, /reset, /exit")

    def ask(self, text: str, on_text=None) -> Reply:
        """One user turn (with the images attached since the last one) and the streamed reply, kept in the history."""
        content = "".join(f"{IMAGE_TOKEN}\n" for _ in self.pending) + text
        messages, images = self.messages + [{"role": "user", "content": content}], self.images + self.pending
        try:  # a conversation that no longer fits changes nothing
            prompt = self.bot.encode(messages, images)
        except UserError as e:
            raise UserError(f"{e} (/reset starts a new conversation)") from None
        reply = self.bot.reply(messages, images, self.gen, on_text, prompt=prompt)
        self.messages = messages + [{"role": "assistant", "content": reply.text}]
        self.images, self.pending = images, []
        return reply
