"""eval and generate: held-out accuracy of a model folder or an ONNX export, and answers to one prompt.

The ONNX paths (`--onnx DIR`) run on onnxruntime alone: nothing here imports torch unless a model folder is used.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import UserError
from ..records.conversations import eval_examples, prompt_example
from ..records.encoder import encoder_for
from ..records.scoring import prediction_rows, score, write_eval

# What a run's saved recipe says about using its model: the data it was evaluated on and encoded with, and
# how it generates. eval, generate, chat and serve start from these (then -c / --set).
RUN_DEFAULTS = ("data.eval", "data.max_length", "data.system_prompt", "data.columns", "gen.max_new_tokens",
                "gen.temperature", "gen.top_p", "gen.batch_size")


def run_defaults(folder: str | Path | None) -> dict:
    """RUN_DEFAULTS from the config.yaml a training run (or its ONNX export) keeps; {} where there is none."""
    import yaml
    saved = Path(folder) / "config.yaml" if folder else None
    if saved is None or not saved.is_file():
        return {}
    try:
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    out = {}
    for key in RUN_DEFAULTS:
        section, name = key.split(".")
        if isinstance(data.get(section), dict) and name in data[section]:
            out[key] = data[section][name]
    return out


def _load(model_dir, cfg):
    from ..core.model import load_model, resolve_dtype
    return load_model(model_dir, dtype=resolve_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code)


def run_eval(model_dir: str | None, cfg, out_dir: str | Path | None, progress=None, onnx: str | Path | None = None,
             status=None) -> dict:
    """Exact-match VQA and POPE metrics of a model folder (or, with `onnx`, an ONNX export) on `data.eval`;
    `status(text)` hears what happens before the first answer."""
    t0 = time.time()
    status = status or (lambda text: None)
    if not cfg.data.eval:
        raise UserError("no eval data: pass --data FILE or set data.eval")
    if not onnx:
        if model_dir is None:
            raise UserError("give a MODEL_DIR or --onnx DIR")
        from .checks import check_model_dir
        check_model_dir(model_dir)
    from ..records.sources import source_problem
    if source_problem(cfg.data.eval):  # said before any model loads
        raise UserError(source_problem(cfg.data.eval))
    status(f"loading {onnx or model_dir}")
    if onnx:
        from ..edge.runner import OnnxLMM
        model = OnnxLMM(onnx)
        status(f"encoding {cfg.data.eval}")
        examples = eval_examples(cfg.data.eval, encoder_for(model, cfg.data), cfg.data)
        preds = model.answers(examples, cfg.gen, progress)
        metrics, rows = score(examples, preds), prediction_rows(examples, preds)
    else:
        from ..core.generation import evaluate_model
        model = _load(model_dir, cfg)
        status(f"encoding {cfg.data.eval}")
        metrics, rows = evaluate_model(model, cfg.data.eval, cfg, progress)
    metrics["seconds"] = time.time() - t0
    result = {"command": "eval", "output_dir": str(out_dir) if out_dir else None, "metrics": metrics,
              "artifacts": write_eval(out_dir, rows, metrics)}
    return {**result, "onnx": str(onnx)} if onnx else result


def run_generate(model_dir: str | None, image: str | None, prompt: str, cfg, onnx: str | Path | None = None,
                 deltas: list | None = None) -> dict:
    """The answer to one prompt: from a model folder, an ONNX export, or a base with BitDelta deltas (one each)."""
    if onnx:
        from ..edge.runner import OnnxLMM
        runner = OnnxLMM(onnx)
        example = prompt_example(encoder_for(runner, cfg.data), image, prompt)
        g = cfg.gen
        toks = runner.generate([example.input_ids], [example.images], g.max_new_tokens, g.temperature, g.top_p, seed=0)[0]
        return {"command": "generate", "output_dir": None, "metrics": {"prompt_tokens": len(example.input_ids)},
                "artifacts": {}, "answer": runner.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                "onnx": str(onnx)}
    if model_dir is None:
        raise UserError("give a MODEL_DIR or --onnx DIR")
    if deltas:
        from .bitdelta import run_generate_deltas
        return run_generate_deltas(model_dir, deltas, image, prompt, cfg)
    from ..core.generation import answer_prompt
    answer, n_tokens = answer_prompt(_load(model_dir, cfg), image, prompt, cfg)
    return {"command": "generate", "output_dir": None, "metrics": {"prompt_tokens": n_tokens},
            "artifacts": {}, "answer": answer}
