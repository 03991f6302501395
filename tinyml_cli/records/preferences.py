"""Preference records: TRL's layouts as tinyml's preference pairs, each side encoded with labels on its response.

A preference record is `{"image", "prompt", "chosen", "rejected"}`, where `prompt` is a string or a list of
chat messages (multi-turn allowed; `<image>` marks the image) and `chosen` / `rejected` are a string or a
one-message assistant list; TRL's conversational and implicit-prompt forms are taken too. Earlier assistant
turns of the prompt are context, not targets.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import IMAGE_TOKEN
from .conversations import Example, check_image, content_text, image_paths
from .encoder import Encoder
from .sources import check_all, parse_all


def preference_record(record: dict) -> dict:
    """A TRL-style preference record as tinyml's preference form {"image", "prompt", "chosen", "rejected"}.

    Takes the standard form (prompt / chosen / rejected strings), the conversational one (lists of messages
    whose content may be OpenAI parts with {"type": "image"}; multi-turn prompts stay a list of text
    messages), and the implicit-prompt conversational form (chosen / rejected full conversations sharing their
    first turns). `images` or `image` carry the images; a prompt with images but no `<image>` placeholder gets
    them in front of its first user turn, one per image. Other fields (id, type...) are kept.
    """
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if chosen is None or rejected is None:
        raise ValueError("a preference record needs 'chosen' and 'rejected'")
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        n = 0  # implicit prompt: the turns both conversations share
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if prompt is None:
        raise ValueError("a preference record needs a 'prompt'")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                                 for t in prompt):
            raise ValueError("prompt: a list of {'role', 'content'} messages is expected")
        prompt = [{"role": t["role"], "content": content_text(t.get("content"), t["role"])} for t in prompt]
    elif not isinstance(prompt, str):
        raise ValueError(f"prompt is not text: {prompt!r}"[:120])

    def answer(x, name):
        if isinstance(x, list):  # conversational: the assistant turn(s)
            x = "\n".join(content_text(t.get("content"), "assistant") for t in x if isinstance(t, dict))
        if not isinstance(x, str) or not x.strip():
            raise ValueError(f"'{name}' is empty or not text")
        return x

    images = record.get("images", record.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    if isinstance(prompt, str):
        if images and IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
    elif images and not any(IMAGE_TOKEN in t["content"] for t in prompt):
        first = next((i for i, t in enumerate(prompt) if t["role"] == "user"), None)
        if first is None:
            raise ValueError("prompt: no user turn to hold the image")
        prompt[first]["content"] = f"{IMAGE_TOKEN}\n" * len(images) + prompt[first]["content"]
    rest = {k: v for k, v in record.items() if k not in ("images", "image", "prompt", "chosen", "rejected")}
    return {**rest, "image": images, "prompt": prompt, "chosen": answer(chosen, "chosen"),
            "rejected": answer(rejected, "rejected")}


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: Example  # the prompt alone, encoded for generation (PPO rollouts)
    meta: dict = field(default_factory=dict)


def _messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"empty '{what}'")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a string or a list of messages")
    msgs = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "user", "assistant", "system"):
            raise ValueError(f"'{what}': a message needs a role (user / assistant / system) and string content")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def response_only(labels: list[int]) -> list[int]:
    """Keep the labels of the last labelled run (the response); earlier assistant turns become context."""
    out, i = [-100] * len(labels), len(labels) - 1
    while i >= 0 and labels[i] == -100:
        i -= 1
    while i >= 0 and labels[i] != -100:
        out[i] = labels[i]
        i -= 1
    return out


def parse_pair(rec, root: Path, enc: Encoder | None, decode_images: bool = False) -> Pair:
    """One preference record (tinyml's form, see `preference_record`) as a Pair; raises ValueError naming what is
    wrong. Prompt + response must fit data.max_length whole: a pair is compared on whole responses, and a cut
    final response would leave an earlier assistant turn, or a shared prefix, as both sides' target (a silent
    tie). Without an encoder only the structure and the images are checked (`data validate` with no tokenizer)."""
    if isinstance(rec, ValueError):
        raise rec
    if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
        raise ValueError("a preference record needs 'prompt', 'chosen' and 'rejected'")
    prompt = _messages(rec["prompt"], "user", "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError("'prompt' must end with a user turn")
    imgs = image_paths(rec, root)
    for img in imgs:
        check_image(img, decode=decode_images)
    responses = {}
    for key in ("chosen", "rejected"):
        resp = _messages(rec[key], "assistant", key)
        if len(resp) != 1 or resp[0]["role"] != "assistant" or not resp[0]["content"].strip():
            raise ValueError(f"'{key}' must be one non-empty assistant answer")
        responses[key] = resp
    meta = {k: rec[k] for k in ("id", "type") if k in rec}
    meta["answer"] = responses["chosen"][0]["content"]
    if enc is None:
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in prompt)
        if placeholders != len(imgs):
            raise ValueError(f"{placeholders} '<image>' placeholder(s) for {len(imgs)} image(s)")
        return Pair(Example([], [], imgs), Example([], [], imgs), Example([], [], imgs), meta)
    sides = []
    for key, resp in responses.items():
        ids, labels = enc.encode(prompt + resp, imgs, truncate=False)
        if len(ids) > enc.max_length:
            raise ValueError(f"prompt + '{key}' response take {len(ids)} tokens > data.max_length={enc.max_length}: "
                             "the response would be cut (raise data.max_length or shorten the prompt)")
        sides.append(Example(ids, response_only(labels), imgs))
    p_ids, p_labels = enc.encode(prompt, imgs, for_generation=True)
    return Pair(sides[0], sides[1], Example(p_ids, p_labels, imgs), meta)


def load_pairs(path: str | Path, enc: Encoder, on_error: str = "fail",
               columns: dict | None = None) -> tuple[list[Pair], list[str]]:
    """Encode every preference record of a data source (JSON / JSONL, parquet, `datasets` folder; TRL's standard
    or conversational columns, renamed by `data.columns`); bad records fail or are skipped, as for sft."""
    p = Path(path)
    root = p if p.is_dir() else p.parent
    return parse_all(p, lambda rec: parse_pair(preference_record(rec), root, enc), on_error, columns,
                     "preference record")


def is_preference_record(record) -> bool:
    """A record in one of the preference layouts (it has chosen and rejected), not a conversation."""
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def validate_pairs(path: str | Path, enc: Encoder | None = None, columns: dict | None = None,
                   records: list | None = None) -> tuple[int, list[str]]:
    """Every problem training (reward, dpo, ppo) would find in a preference data set, at once (images fully
    decoded): (records, problems)."""
    p = Path(path)
    root = p if p.is_dir() else p.parent
    return check_all(p, lambda rec: parse_pair(preference_record(rec), root, enc, decode_images=True), columns,
                     "preference record", records)
