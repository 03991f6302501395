"""eval and generate: exact-match VQA accuracy (overall and per question type), POPE metrics, answers.

POPE (Li et al. 2023, arXiv 2305.10355) asks yes/no questions about objects, half of them absent; its
metrics treat "yes" as the positive class, so precision falls when the model hallucinates objects.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from . import UserError


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def answers_for(model, examples: list, gen, progress=None) -> list[str]:
    """Generated answers (decoded, special tokens removed) for encoded generation prompts."""
    import torch

    from .data import Collator, ImageLoader
    model.eval()
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=True)
    out = []
    # Sorting by length keeps left padding short; answers are put back in the original order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    answers = {}
    for s in range(0, len(order), gen.batch_size):
        idx = order[s:s + gen.batch_size]
        batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in idx]).items()}
        batch.pop("labels")
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                 top_p=gen.top_p)
        for i, seq in zip(idx, new):
            answers[i] = model.tokenizer.decode(seq, skip_special_tokens=True).strip()
        if progress:
            progress(min(s + gen.batch_size, len(order)), len(order))
    out = [answers[i] for i in range(len(examples))]
    return out


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


def eval_examples(model, path: str, cfg):
    from .data import Encoder, load_examples
    enc = Encoder(model.tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.system_prompt)
    examples, _ = load_examples(path, enc, cfg.data.on_error, for_generation=True, columns=cfg.data.columns)
    for e in examples:  # the answer is the record's `answer`, else its last assistant turn
        if "answer" not in e.meta and e.meta["messages"][-1]["role"] == "assistant":
            e.meta["answer"] = e.meta["messages"][-1]["content"]
    return examples


def evaluate_model(model, path: str, cfg, progress=None) -> tuple[dict, list[dict]]:
    examples = eval_examples(model, path, cfg)
    preds = answers_for(model, examples, cfg.gen, progress)
    rows = [{"id": e.meta.get("id"), "type": e.meta.get("type"), "answer": e.meta.get("answer"), "prediction": p}
            for e, p in zip(examples, preds)]
    return score(examples, preds), rows


def run_eval(model_dir: str, cfg, out_dir: str | Path | None, progress=None) -> dict:
    from .model import load_model, resolve_dtype
    t0 = time.time()
    if not cfg.data.eval:
        raise UserError("no eval data: pass --data FILE or set data.eval")
    model = load_model(model_dir, dtype=resolve_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code)
    metrics, rows = evaluate_model(model, cfg.data.eval, cfg, progress)
    metrics["seconds"] = time.time() - t0
    return {"command": "eval", "output_dir": str(out_dir) if out_dir else None, "metrics": metrics,
            "artifacts": write_eval(out_dir, rows, metrics)}


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


def run_generate(model_dir: str, image: str | None, prompt: str, cfg) -> dict:
    from .model import load_model, resolve_dtype
    model = load_model(model_dir, dtype=resolve_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code)
    answer, n_tokens = answer_prompt(model, image, prompt, cfg)
    return {"command": "generate", "output_dir": None, "metrics": {"prompt_tokens": n_tokens},
            "artifacts": {}, "answer": answer}


def answer_prompt(model, image: str | None, prompt: str, cfg) -> tuple[str, int]:
    """A loaded model's answer to one prompt (about one image or none), and the prompt's token count."""
    from .data import Encoder, Example
    if image and "<image>" not in prompt:
        prompt = "<image>\n" + prompt
    imgs = []
    if image:
        p = Path(image)
        if not p.is_file():
            raise UserError(f"image not found: {p}")
        imgs = [p]
    enc = Encoder(model.tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.system_prompt)
    try:
        ids, labels = enc.encode([{"role": "user", "content": prompt}], len(imgs), for_generation=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    return answers_for(model, [Example(ids, labels, imgs)], cfg.gen)[0], len(ids)
