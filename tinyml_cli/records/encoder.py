"""The encoder: chat messages -> token ids and assistant-only labels, `<image>` expanded to the image tokens.

Torch-free, so that the ONNX runner encodes prompts exactly as training and PyTorch generation do;
`encoder_for` is the one place an Encoder is made from a model (PyTorch, ONNX, or tokenizer-only).
"""

from __future__ import annotations

from .. import IMAGE_TOKEN, UserError


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

    def encode(self, msgs: list[dict], n_images: int, for_generation: bool = False,
               truncate: bool = True) -> tuple[list[int], list[int]]:
        """(ids, labels), cut to max_length unless `truncate` is False (then the caller checks the length)."""
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
        return self._truncate(ids, labels, for_generation) if truncate else (ids, labels)

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


def encoder_for(model, data) -> Encoder:
    """The Encoder of a model (anything with `tokenizer` and `num_image_tokens`) under a recipe's `data` section."""
    return Encoder(model.tokenizer, model.num_image_tokens, data.max_length, data.system_prompt)
