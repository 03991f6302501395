"""Synthetic shapes data: small PNG scenes of 1-3 coloured shapes, with LLaVA-format records.

Every scene puts its objects in distinct cells of a 2x2 grid, with distinct colours and distinct shapes,
so that every question below has exactly one right answer:
  colour    "What color is the circle?"                      -> "red"
  shape     "What shape is the red object?"                  -> "circle"
  count     "How many objects are there?"                    -> "two"
  existence "Is there a red circle in the image?"            -> "yes" / "no" (POPE-style, half absent)
  position  "Is the red circle on the left or the right?"    -> "left" / "right"
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 100, 240),
          "yellow": (235, 215, 40), "purple": (170, 70, 220)}


SHAPES = ["circle", "square", "triangle", "cross"]


CELLS = {(0, 0): "top left", (1, 0): "top right", (0, 1): "bottom left", (1, 1): "bottom right"}


NUMBERS = {1: "one", 2: "two", 3: "three"}


QUESTION_TYPES = ["color", "shape", "count", "existence", "position"]


IMAGE_SIZE = 32


@dataclass
class Obj:
    color: str
    shape: str
    cell: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def side(self) -> str:
        return "left" if self.cell[0] == 0 else "right"


def random_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 3)
    colors = rng.sample(list(COLORS), n)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(list(CELLS), n)
    return [Obj(c, s, cell) for c, s, cell in zip(colors, shapes, cells)]


def draw_scene(objs: list[Obj], rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    bg = tuple(rng.randint(15, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    half = size // 2
    for o in objs:
        r = rng.uniform(0.30, 0.42) * half  # radius of the shape inside its cell
        cx = o.cell[0] * half + half / 2 + rng.uniform(-1.5, 1.5)
        cy = o.cell[1] * half + half / 2 + rng.uniform(-1.5, 1.5)
        col = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[o.color])
        box = [cx - r, cy - r, cx + r, cy + r]
        if o.shape == "circle":
            d.ellipse(box, fill=col)
        elif o.shape == "square":
            d.rectangle(box, fill=col)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        else:  # cross
            w = r / 2.6
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return img


def caption(objs: list[Obj]) -> str:
    parts = [f"a {o.name} at the {CELLS[o.cell]}" for o in sorted(objs, key=lambda o: (o.cell[1], o.cell[0]))]
    return ("There is " if len(parts) == 1 else f"There are {NUMBERS[len(parts)]} objects: ") + ", ".join(parts) + "."


def absent_object(objs: list[Obj], rng: random.Random) -> tuple[str, str]:
    """An object not in the scene; half the time a present shape in a wrong colour (adversarial POPE)."""
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        o = rng.choice(objs)
        choices = [(c, o.shape) for c in COLORS if (c, o.shape) not in present]
    else:
        choices = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    return rng.choice(choices)


def question(kind: str, objs: list[Obj], rng: random.Random) -> tuple[str, str]:
    o = rng.choice(objs)
    if kind == "color":
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        return f"What shape is the {o.color} object?", o.shape
    if kind == "count":
        return "How many objects are there?", NUMBERS[len(objs)]
    if kind == "existence":
        if rng.random() < 0.5:
            return f"Is there a {o.name} in the image?", "yes"
        c, s = absent_object(objs, rng)
        return f"Is there a {c} {s} in the image?", "no"
    if kind == "position":
        return f"Is the {o.name} on the left or the right?", o.side
    raise ValueError(kind)


def _conv(turns: list[tuple[str, str]]) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def synth_shapes(out: str | Path, n: int = 4000, n_eval: int = 200, seed: int = 0) -> dict:
    """Write images/, captions.jsonl (alignment), train.jsonl (multi-turn VQA) and eval.jsonl (held out).

    eval.jsonl has one single-turn question of every type per held-out image, each with `type` and
    `answer`; its existence questions are the POPE split (half about absent objects).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, train, evals = [], [], []
    for i in range(n + n_eval):
        objs = random_scene(rng)
        name = f"images/{i:06d}.png"
        draw_scene(objs, rng).save(out / name)
        if i < n:
            captions.append({"id": f"cap{i}", "image": name, "conversations": _conv(
                [(rng.choice(["Describe the image.", "What is in the image?", "Describe this picture briefly."]),
                  caption(objs))])})
            kinds = rng.sample(QUESTION_TYPES, rng.randint(3, 5))
            train.append({"id": f"vqa{i}", "image": name,
                          "conversations": _conv([question(k, objs, rng) for k in kinds])})
        else:
            for k in QUESTION_TYPES:
                q, a = question(k, objs, rng)
                evals.append({"id": f"eval{i}-{k}", "image": name, "type": k, "answer": a,
                              "conversations": _conv([(q, a)])})
    write_jsonl(out / "captions.jsonl", captions)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    return {"captions": str(out / "captions.jsonl"), "train": str(out / "train.jsonl"),
            "eval": str(out / "eval.jsonl"), "images": n + n_eval}


# ------------------------------------------------------------------------------------- preference pairs
PREF_TYPES = ["color", "shape", "count", "existence", "position"]


def binding_swap(objs: list[Obj], rng: random.Random) -> tuple[str, str] | None:
    """An absent object made of a present colour and a present shape of two different objects (attribute binding)."""
    present = {(o.color, o.shape) for o in objs}
    swaps = [(a.color, b.shape) for a in objs for b in objs if a is not b and (a.color, b.shape) not in present]
    return rng.choice(swaps) if swaps else None


def hallucinated_pair(kind: str, objs: list[Obj], rng: random.Random) -> tuple[str, str, str]:
    """(question, chosen, rejected): the rejected answer differs from the right one only in what it hallucinates."""
    o = rng.choice(objs)
    others = [x for x in objs if x is not o]
    if kind == "color":  # another object's colour half the time (a binding error), else any wrong colour
        wrong = rng.choice(others).color if others and rng.random() < 0.5 else rng.choice([c for c in COLORS if c != o.color])
        return f"What color is the {o.shape}?", o.color, wrong
    if kind == "shape":
        wrong = rng.choice(others).shape if others and rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != o.shape])
        return f"What shape is the {o.color} object?", o.shape, wrong
    if kind == "count":
        return "How many objects are there?", NUMBERS[len(objs)], rng.choice([w for k, w in NUMBERS.items() if k != len(objs)])
    if kind == "existence":
        if rng.random() < 0.5:  # a present object: denying it is the error (keeps the data from teaching "always no")
            return f"Is there a {o.name} in the image?", "yes", "no"
        absent = (binding_swap(objs, rng) if rng.random() < 0.5 else None) or absent_object(objs, rng)
        return f"Is there a {absent[0]} {absent[1]} in the image?", "no", "yes"
    if kind == "position":
        return f"Is the {o.name} on the left or the right?", o.side, "right" if o.side == "left" else "left"
    raise ValueError(kind)


def _pref_record(i: int, name: str, objs: list[Obj], kind: str, rng: random.Random) -> dict:
    prompt = []
    if rng.random() < 0.3:  # multi-turn: an earlier question answered correctly
        q0, a0 = question(rng.choice(QUESTION_TYPES), objs, rng)
        prompt += [{"role": "user", "content": "<image>\n" + q0}, {"role": "assistant", "content": a0}]
    q, good, bad = hallucinated_pair(kind, objs, rng)
    prompt.append({"role": "user", "content": q if prompt else "<image>\n" + q})
    return {"id": f"pref{i}-{kind}", "image": name, "type": kind, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}


def synth_preferences(out: str | Path, n: int = 24000, n_eval: int = 1000, n_probe: int = 1000, seed: int = 1) -> dict:
    """Write images/, pref_train.jsonl, pref_eval.jsonl (TRL-style `prompt` / `chosen` / `rejected`) and pope_probe.jsonl.

    Each scene gives one pair of a random type. pope_probe.jsonl is a harder, held-out POPE split in the eval
    format: scenes of three objects, and every absent object is a binding swap (the colour of one object with
    the shape of another: "Is there a red circle?" next to a red square and a blue circle).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, evals, probe = [], [], []
    for i in range(n + n_eval + n_probe):
        objs = random_scene(rng)
        if i >= n + n_eval:
            while len(objs) < 3:
                objs = random_scene(rng)
        name = f"images/{i:06d}.png"
        draw_scene(objs, rng).save(out / name)
        if i < n + n_eval:
            (train if i < n else evals).append(_pref_record(i, name, objs, rng.choice(PREF_TYPES), rng))
            continue
        o = rng.choice(objs)
        c, s = (o.color, o.shape) if rng.random() < 0.5 else binding_swap(objs, rng)
        answer = "yes" if (c, s) in {(x.color, x.shape) for x in objs} else "no"
        probe.append({"id": f"probe{i}", "image": name, "type": "existence", "answer": answer,
                      "conversations": _conv([(f"Is there a {c} {s} in the image?", answer)])})
    write_jsonl(out / "pref_train.jsonl", train)
    write_jsonl(out / "pref_eval.jsonl", evals)
    write_jsonl(out / "pope_probe.jsonl", probe)
    return {"train": str(out / "pref_train.jsonl"), "eval": str(out / "pref_eval.jsonl"),
            "pope_probe": str(out / "pope_probe.jsonl"), "images": n + n_eval + n_probe}


def synth_shapes_command(out, n: int, n_eval: int, seed: int) -> dict:
    """`tinyml data synth-shapes`: the files and the JSON summary."""
    from .. import UserError
    if n < 1 or n_eval < 1:
        raise UserError("--n and --n-eval must be at least 1")
    files = synth_shapes(out, n=n, n_eval=n_eval, seed=seed)
    images = files.pop("images")
    return {"command": "data synth-shapes", "output_dir": str(out), "metrics": {"images": images}, "artifacts": files}


def synth_preferences_command(out, n: int, n_eval: int, n_probe: int, seed: int) -> dict:
    """`tinyml data synth-preferences`: the files and the JSON summary."""
    from .. import UserError
    if n < 1 or n_eval < 0 or n_probe < 0:
        raise UserError("--n must be at least 1, --n-eval and --n-probe at least 0")
    files = synth_preferences(out, n=n, n_eval=n_eval, n_probe=n_probe, seed=seed)
    images = files.pop("images")
    return {"command": "data synth-preferences", "output_dir": str(out), "metrics": {"images": images},
            "artifacts": files}
