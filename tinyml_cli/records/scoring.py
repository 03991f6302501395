"""Scoring of generated answers: exact-match VQA accuracy (overall and per question type), POPE metrics, and
the rule rewards of the online methods.

POPE (Li et al. 2023, arXiv 2305.10355) asks yes/no questions about objects, half of them absent; its
metrics treat "yes" as the positive class, so precision falls when the model hallucinates objects.
Rule rewards (verifiable rewards, as in R1-V / VLM-R1 and TRL's GRPO examples), each 0 or 1:
`exact_match` (the response equals the reference answer, normalised), `answer_tags` (the text inside
`<answer>...</answer>` equals it), `format` (the whole response matches a regular expression).
"""


from __future__ import annotations

import re
from pathlib import Path

from .. import UserError


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


# R1-style reasoning then answer; the whole response must match (re.fullmatch, DOTALL)
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


def exact_match(text: str, answer: str | None, pattern: str = "") -> float:
    return float(normalize(text) == normalize(answer or ""))


def answer_tags(text: str, answer: str | None, pattern: str = "") -> float:
    found = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return float(found is not None and normalize(found.group(1)) == normalize(answer or ""))


def format_match(text: str, answer: str | None = None, pattern: str = "") -> float:
    return float(re.fullmatch(pattern or DEFAULT_FORMAT, text.strip(), re.DOTALL) is not None)


RULES = {"exact_match": exact_match, "answer_tags": answer_tags, "format": format_match}
NEEDS_ANSWER = ("exact_match", "answer_tags")


def pope_metrics(preds: list[str], golds: list[str]) -> dict:
    yes_p = [normalize(p).startswith("yes") for p in preds]
    yes_g = [normalize(g) == "yes" for g in golds]
    tp = sum(p and g for p, g in zip(yes_p, yes_g))
    fp = sum(p and not g for p, g in zip(yes_p, yes_g))
    fn = sum(g and not p for p, g in zip(yes_p, yes_g))
    tn = len(preds) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / max(len(preds), 1), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(yes_p) / max(len(preds), 1), "fp_rate": fp / max(fp + tn, 1)}


def score(examples: list, preds: list[str]) -> dict:
    """Exact-match accuracy overall and per `type`; POPE metrics on the existence (yes/no) questions."""
    golds = [e.meta.get("answer") for e in examples]
    if any(g is None for g in golds):
        raise UserError("eval data: every record needs an 'answer' (or a final assistant turn)")
    hits = [normalize(p) == normalize(g) for p, g in zip(preds, golds)]
    by_type: dict[str, list[bool]] = {}
    for e, h in zip(examples, hits):
        by_type.setdefault(e.meta.get("type", "all"), []).append(h)
    metrics = {"vqa_accuracy": sum(hits) / len(hits), "n": len(hits),
               "vqa_accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}
    yn = [(p, g) for e, p, g in zip(examples, preds, golds) if normalize(g) in ("yes", "no")
          and e.meta.get("type", "existence") == "existence"]
    if yn:
        metrics["pope"] = pope_metrics([p for p, _ in yn], [g for _, g in yn])
    return metrics


def prediction_rows(examples: list, preds: list[str]) -> list[dict]:
    """One row per held-out record for predictions.jsonl."""
    return [{"id": e.meta.get("id"), "type": e.meta.get("type"), "answer": e.meta.get("answer"), "prediction": p}
            for e, p in zip(examples, preds)]


def write_eval(out_dir: str | Path | None, rows: list[dict], metrics: dict) -> dict:
    """predictions.jsonl and eval_metrics.json in out_dir (if given); returns their paths."""
    import json
    if not out_dir:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"predictions": str(out / "predictions.jsonl"), "metrics": str(out / "eval_metrics.json")}
