"""The encoder: chat messages -> token ids and assistant-only labels, `<image>` expanded to the image tokens.

Torch-free, so that the ONNX runner encodes prompts exactly as training and PyTorch generation do;
`encoder_for` is the one place an Encoder is made from a model (PyTorch, ONNX, or tokenizer-only).
"""

from __future__ import annotations

from .. import IMAGE_TOKEN, UserError


class Encoder:
    """Turns messages into token ids and labels: only assistant turns are labelled, image tokens never.

    `images` (a processor-based model's, see core.hf_vlm.ProcessorImageTokens) renders the chat with the family's
    template and says which tokens each image becomes (`placeholder` in the rendered text, `ids(image)`, which
    may depend on the image); without it `<image>` becomes `num_image_tokens` image tokens.
    """

    def __init__(self, tokenizer, num_image_tokens: int | None, max_length: int, system_prompt: str = "",
                 images=None, render=None):
        self.tok, self.n_img, self.max_length, self.system = tokenizer, num_image_tokens, max_length, system_prompt
        self.images = images
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if images is None else None
        self.placeholder = IMAGE_TOKEN if images is None else images.placeholder
        # render(messages, add_generation_prompt): a faster way to the tokenizer's chat template (see
        # core.hfutil.compiled_chat_template), used once it has rendered the first conversation exactly as
        # apply_chat_template does, with and without the generation prompt
        self.render, self._render_checked = render, False

    def _render(self, msgs, gen_prompt: bool) -> str:
        if self.images is not None:
            return self.images.render(msgs, gen_prompt)
        if self.render and not self._render_checked:
            self._render_checked = True
            try:
                same = all(self.render(msgs, g) == self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=g)
                           for g in (True, False))
            except Exception:  # apply_chat_template, below, says what is wrong
                same = False
            self.render = self.render if same else None
        if self.render:
            return self.render(msgs, gen_prompt)
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    def _pieces(self, text: str) -> list:
        """Rendered text as its pieces in order: strings, and None where an image's tokens go."""
        out = []
        for i, piece in enumerate(text.split(self.placeholder)):
            if i:
                out.append(None)
            if piece:
                out.append(piece)
        return out

    def _tokens(self, segments: list, images: list) -> tuple[list[int], list[int], list]:
        """(ids, labels, image spans) of (labelled, piece) segments: the text pieces tokenized in one call (the
        tokenizer's per-call cost dominates short pieces), each None replaced by the next image's tokens."""
        texts = [x for _, x in segments if x is not None]
        found = iter(self.tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
        queue, ids, labels, spans = list(images), [], [], []
        for labelled, x in segments:
            if x is None:
                if not queue:
                    raise ValueError("the chat template renders more images than the record has")
                image = queue.pop(0)
                t = [self.image_id] * self.n_img if self.images is None else self.images.ids(image)
                spans.append((len(ids), len(ids) + len(t)))
                ids += t
                labels += [-100] * len(t)
            else:
                t = next(found)
                ids += t
                labels += t if labelled else [-100] * len(t)
        return ids, labels, spans

    def encode(self, msgs: list[dict], images, for_generation: bool = False,
               truncate: bool = True) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation about `images` (their paths; a count will do for fixed image tokens),
        cut to max_length unless `truncate` is False (then the caller checks the length)."""
        images = list(images) if not isinstance(images, int) else [None] * images
        n_images = len(images)
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
        if placeholders != n_images:
            raise ValueError(f"{placeholders} '<image>' placeholder(s) for {n_images} image(s)")
        if self.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system}] + msgs
        if for_generation and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if for_generation:
            ids, _, spans = self._tokens([(False, x) for x in self._pieces(self._render(msgs, True))], images)
            return self._truncate(ids, [-100] * len(ids), True, spans) if truncate else (ids, [-100] * len(ids))
        segments, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], True)
            full = self._render(msgs[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError("the tokenizer's chat template does not render conversations prefix by prefix")
            # the prompt's tokens are never labelled, the answer's are (its image tokens excepted)
            segments += [(False, x) for x in self._pieces(prompt[len(done):])]
            segments += [(True, x) for x in self._pieces(full[len(prompt):])]
            done = full
        if not segments:
            raise ValueError("no assistant turn to learn from")
        ids, labels, spans = self._tokens(segments, images)
        return self._truncate(ids, labels, False, spans) if truncate else (ids, labels)

    def _truncate(self, ids, labels, for_generation, spans=()):
        if len(ids) <= self.max_length:
            return ids, labels
        if for_generation:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than data.max_length={self.max_length}")
        # Cutting into the image tokens would leave a record whose image no longer matches its tokens:
        # other toolkits corrupt such records silently, here it is an error.
        end = max((b for _, b in spans), default=0)
        if end > self.max_length:
            raise ValueError(f"image tokens end at {end} > data.max_length={self.max_length}")
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(x == -100 for x in labels[1:]):
            raise ValueError(f"no assistant token left after truncation to data.max_length={self.max_length}")
        return ids, labels


def encoder_for(model, data) -> Encoder:
    """The Encoder of a model (anything with `tokenizer` and `num_image_tokens`, and for a processor-based model
    `image_tokens`) under a recipe's `data` section."""
    return Encoder(model.tokenizer, model.num_image_tokens, data.max_length, data.system_prompt,
                   getattr(model, "image_tokens", None), getattr(model, "render_chat", None))
