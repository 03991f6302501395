"""Preference, prompt and unpaired records: TRL's layouts as tinyml's pairs, prompts and labelled answers.

A preference record is `{"image", "prompt", "chosen", "rejected"}`, where `prompt` is a string or a list of
chat messages (multi-turn allowed; `<image>` marks the image) and `chosen` / `rejected` are a string or a
one-message assistant list; TRL's conversational and implicit-prompt forms are taken too. Earlier assistant
turns of the prompt are context, not targets.
The online methods (ppo, grpo, rloo) read prompts, as TRL's GRPO does: `{"image", "prompt"}` with an optional
reference answer (`answer` or `solution`) for rule scorers; a preference record (its chosen answer is the
reference), an unpaired record or an sft conversation (its last assistant turn is the reference) is a prompt too.
KTO reads unpaired records `{"image", "prompt", "completion", "label"}` (label true: a desirable answer); a
preference record gives one desirable and one undesirable answer (TRL's unpair_preference_dataset).
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import IMAGE_TOKEN
from .conversations import Example, check_image, content_text, image_paths, messages_of
from .encoder import Encoder
from .sources import check_all, parse_all


def _prompt_and_images(record: dict, prompt) -> tuple:
    """A record's prompt as a string or a list of text messages, with `<image>` placed for each of its images."""
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                                 for t in prompt):
            raise ValueError("prompt: a list of {'role', 'content'} messages is expected")
        prompt = [{"role": t["role"], "content": content_text(t.get("content"), t["role"])} for t in prompt]
    elif not isinstance(prompt, str):
        raise ValueError(f"prompt is not text: {prompt!r}"[:120])
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
    return prompt, images


def _answer(x, name: str) -> str:
    if isinstance(x, list):  # conversational: the assistant turn(s)
        x = "\n".join(content_text(t.get("content"), "assistant") for t in x if isinstance(t, dict))
    if not isinstance(x, str) or not x.strip():
        raise ValueError(f"'{name}' is empty or not text")
    return x


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
    prompt, images = _prompt_and_images(record, prompt)
    rest = {k: v for k, v in record.items() if k not in ("images", "image", "prompt", "chosen", "rejected")}
    return {**rest, "image": images, "prompt": prompt, "chosen": _answer(chosen, "chosen"),
            "rejected": _answer(rejected, "rejected")}


def prompt_record(record: dict) -> dict:
    """Any record the online methods can take, as {"image", "prompt"[, "answer"]} (see the module docstring).

    The reference answer is `answer` (else `solution`), a preference record's chosen answer, a desirable unpaired
    answer, or an sft conversation's last assistant turn; a record may have none (then only reward models and
    reference-free rules can score it).
    """
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    if "chosen" in record or "rejected" in record:
        pref = preference_record(record)
        return {k: v for k, v in pref.items() if k not in ("chosen", "rejected")} | {"answer": pref["chosen"]}
    rest = {k: v for k, v in record.items() if k not in ("images", "image", "prompt", "completion", "label",
                                                          "solution", "conversations", "messages")}
    if "prompt" not in record:
        if "conversations" not in record and "messages" not in record:
            raise ValueError("a prompt record needs a 'prompt' (or a conversation whose last user turn is the prompt)")
        msgs = messages_of(record)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last is None:
            raise ValueError("the conversation has no user turn to prompt with")
        prompt, images = _prompt_and_images(record, msgs[:last + 1])
        reply = msgs[last + 1]["content"] if last + 1 < len(msgs) else None
        return {**rest, "image": images, "prompt": prompt, **({"answer": record.get("answer", reply)} if
                                                               record.get("answer", reply) else {})}
    prompt, images = _prompt_and_images(record, record["prompt"])
    answer = record.get("answer", record.get("solution"))
    if answer is None and record.get("label") is True and record.get("completion") is not None:
        answer = _answer(record["completion"], "completion")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)  # numbers in maths data sets
    return {**rest, "image": images, "prompt": prompt, **({"answer": answer} if answer is not None else {})}


def unpaired_records(record: dict) -> list[dict]:
    """A KTO record as [{"image", "prompt", "completion", "label"}]: itself, or a preference record's two answers."""
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    if "chosen" in record or "rejected" in record:
        pref = preference_record(record)
        base = {k: v for k, v in pref.items() if k not in ("chosen", "rejected")}
        return [{**base, "completion": pref["chosen"], "label": True},
                {**base, "completion": pref["rejected"], "label": False}]
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise ValueError(f"an unpaired record needs 'prompt', 'completion' and 'label' (no '{key}')")
    if not isinstance(record["label"], bool):
        raise ValueError(f"'label' must be true or false, got {record['label']!r}"[:120])
    prompt, images = _prompt_and_images(record, record["prompt"])
    rest = {k: v for k, v in record.items() if k not in ("images", "image", "prompt", "completion")}
    return [{**rest, "image": images, "prompt": prompt, "completion": _answer(record["completion"], "completion")}]


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: Example  # the prompt alone, encoded for generation (PPO rollouts)
    meta: dict = field(default_factory=dict)


@dataclass
class Prompt:
    """A prompt encoded for generation (the online methods' unit); meta may hold its reference `answer`."""
    prompt: Example
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


def _prompt_messages(rec, root: Path):
    prompt = _messages(rec["prompt"], "user", "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError("'prompt' must end with a user turn")
    imgs = image_paths(rec, root)
    for img in imgs:
        check_image(img)
    return prompt, imgs


def parse_prompt(rec, root: Path, enc: Encoder) -> Prompt:
    prompt, imgs = _prompt_messages(rec, root)
    ids, labels = enc.encode(prompt, imgs, for_generation=True)
    meta = {k: rec[k] for k in ("id", "type", "answer") if k in rec}
    return Prompt(Example(ids, labels, imgs), meta)


def load_prompts(path: str | Path, enc: Encoder, on_error: str = "fail",
                 columns: dict | None = None) -> tuple[list[Prompt], list[str]]:
    """Encode the prompt of every record of a data source for generation (any layout `prompt_record` takes)."""
    p = Path(path)
    root = p if p.is_dir() else p.parent
    return parse_all(p, lambda rec: parse_prompt(prompt_record(rec), root, enc), on_error, columns, "prompt record")


@dataclass
class _Answers:  # the unpaired answers of one record, flattened by load_unpaired
    items: list
    meta: dict = field(default_factory=dict)


def load_unpaired(path: str | Path, enc: Encoder, on_error: str = "fail",
                  columns: dict | None = None) -> tuple[list[Example], list[str]]:
    """Encode KTO's unpaired answers (labels on the answer, `meta["label"]` true when desirable); preference records
    give two each."""
    p = Path(path)
    root = p if p.is_dir() else p.parent

    def parse(rec):
        out = []
        for r in unpaired_records(rec):
            prompt, imgs = _prompt_messages(r, root)
            ids, labels = enc.encode(prompt + [{"role": "assistant", "content": r["completion"]}], imgs)
            out.append(Example(ids, response_only(labels), imgs, {"label": r["label"]} |
                               {k: r[k] for k in ("id", "type") if k in r}))
        return _Answers(out)
    groups, skipped = parse_all(p, parse, on_error, columns, "unpaired record")
    for g in groups:
        for e in g.items:
            e.meta["where"] = g.meta["where"]
    return [e for g in groups for e in g.items], skipped


def mismatched(ex: Example, other: Example, max_length: int) -> Example:
    """ex's prompt (and image) with other's answer: KTO's mismatched pair, whose log-ratio estimates the KL term."""
    start = lambda e: next(i for i, y in enumerate(e.labels) if y != -100)  # noqa: E731 - the answer's first token
    a, b = start(ex), start(other)
    ids = (ex.input_ids[:a] + other.input_ids[b:])[:max_length]
    labels = ([-100] * a + other.labels[b:])[:max_length]
    return Example(ids, labels, ex.images)
