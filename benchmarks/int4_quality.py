"""What int4 keeps of a model: onnxruntime's MatMulNBits quantizer algorithms and block sizes against the fp32 export.

    python benchmarks/int4_quality.py --json --model W/sft --data W/shapes/eval.jsonl --calib W/shapes/train.jsonl

(W: a `benchmarks/real_llm.py --work W` folder, SmolLM2-135M-Instruct + the tiny SigLIP tower, LoRA merged.)
For the fp32 ONNX export and each `--variants` entry (ALGORITHM:BLOCK, algorithms of `edge.int4`: rtn, hqq,
gptq; `nf4` / `int8`: bitsandbytes in PyTorch (the model folder's safetensors as bytes); options
`:b8=lm_head+v_proj+down_proj` keeps those decoder projections at 8 bits (none by default here), `:acc=0` computes
in fp32 instead of MatMulNBits' int8 activations (accuracy level 4), `:emb=0` keeps the embedding table fp32; all
asymmetric, accuracy level 4, int4 embeddings as `tinyml quantize` makes them), on the held-out records, with
tinyml's torch-free runner:
- vqa_accuracy: exact-match answers (greedy, `--new-tokens`), as `tinyml eval`;
- greedy_match: share of generated token positions equal to fp32's (decode.py's measure), and prompts_equal:
  share of answers equal to fp32's token for token;
- perplexity: exp of the mean negative log-likelihood of the held-out conversations' answer tokens (the labels
  of training: assistant turns and their end token), teacher-forced, one record at a time;
- bytes: all three graphs. gptq calibrates the decoder on `--calib-records` training records (image + answer).
One JSON object: `variants` (one row each, fp32 first) and the `vs_fp32` differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def perplexity(runner, examples) -> float:
    import numpy as np
    nll, n = 0.0, 0
    for e in examples:
        logits = runner.sessions["decoder"].run(["logits"], runner.prefill_feed(e.input_ids, e.images))[0][0]
        labels = np.array(e.labels[1:])
        keep = labels != -100
        z = logits[:-1][keep].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(keep.sum()), labels[keep]].sum()
        n += int(keep.sum())
    return math.exp(nll / n)


def held_out(model, a) -> tuple[list, list]:
    """The held-out records encoded for `model` (a runner or a PyTorch model), as real_llm.py trains: prompts for
    generation and whole conversations for perplexity."""
    from tinyml_cli.config import load_config
    from tinyml_cli.records.conversations import eval_examples, load_examples
    from tinyml_cli.records.encoder import encoder_for
    cfg = load_config(None, ["data.system_prompt=Answer briefly.", "data.max_length=256"])
    enc = encoder_for(model, cfg.data)
    return eval_examples(a.data, enc, cfg.data)[:a.prompts], load_examples(a.data, enc, "fail")[0][:a.prompts]


def measure(folder: Path, a, ref_tokens=None) -> dict:
    from tinyml_cli.edge.runner import OnnxLMM, onnx_sizes
    from tinyml_cli.records.scoring import score
    runner = OnnxLMM(folder, threads=a.threads)
    gen, full = held_out(runner, a)
    t = time.time()
    tokens = runner.generated_tokens(gen, a.new_tokens, batch_size=8)
    answers = [runner.tokenizer.decode(x, skip_special_tokens=True).strip() for x in tokens]
    row = {"bytes": onnx_sizes(folder)["total"], "vqa_accuracy": score(gen, answers)["vqa_accuracy"],
           "perplexity": perplexity(runner, full), "seconds": time.time() - t, "tokens": tokens}
    if ref_tokens is not None:
        row |= agreement(ref_tokens, tokens)
    return row


def agreement(ref_tokens, tokens) -> dict:
    """Share of generated positions equal to the reference's, and of answers equal token for token."""
    pairs = [(x, y) for u, v in zip(ref_tokens, tokens) for x, y in zip(u, v)]
    return {"greedy_match": sum(x == y for x, y in pairs) / max(len(pairs), 1),
            "prompts_equal": sum(u == v for u, v in zip(ref_tokens, tokens)) / len(tokens)}


def measure_bnb(folder: Path, a, ref_tokens) -> dict:
    """A bitsandbytes copy (`tinyml quantize --method nf4|int8`) measured the same way, in PyTorch."""
    import torch

    from tinyml_cli.core.generation import generated_tokens
    from tinyml_cli.core.model import load_model
    from tinyml_cli.records.scoring import score
    torch.set_num_threads(a.threads)
    model = load_model(folder)
    gen, full = held_out(model, a)
    t = time.time()
    tokens = generated_tokens(model, gen, a.new_tokens, batch_size=8)
    answers = [model.tokenizer.decode(x, skip_special_tokens=True).strip() for x in tokens]
    nll, n, collate = 0.0, 0, model.collator()
    with torch.no_grad():
        for e in full:
            batch = collate([e])
            k = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(model(**batch)) * k
            n += k
    return {"bytes": sum(f.stat().st_size for f in folder.rglob("*.safetensors")), "bytes_of": "safetensors",
            "vqa_accuracy": score(gen, answers)["vqa_accuracy"], "perplexity": math.exp(nll / n),
            "seconds": time.time() - t, "tokens": tokens, **agreement(ref_tokens, tokens)}


def calibration(fp32: Path, a) -> list[dict]:
    from tinyml_cli.config import load_config
    from tinyml_cli.edge.runner import OnnxLMM
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import encoder_for
    runner = OnnxLMM(fp32, threads=a.threads)
    cfg = load_config(None, ["data.system_prompt=Answer briefly.", "data.max_length=256"])
    examples = load_examples(a.calib, encoder_for(runner, cfg.data), "fail")[0][:a.calib_records]
    return [runner.prefill_feed(e.input_ids, e.images) for e in examples]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", required=True, help="a tinyml model folder (exported to fp32 ONNX under --work)")
    p.add_argument("--data", required=True, help="held-out records (VQA, agreement, perplexity)")
    p.add_argument("--calib", help="training records for gptq's calibration")
    p.add_argument("--calib-records", type=int, default=16)
    p.add_argument("--work", default="runs/int4-quality")
    p.add_argument("--variants", default="rtn:32,rtn:64,rtn:128,hqq:32,hqq:64,hqq:128,gptq:32,gptq:128")
    p.add_argument("--prompts", type=int, default=50, help="held-out records used (at most)")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import META
    work = Path(a.work)
    fp32 = work / "fp32"
    if not (fp32 / META).is_file():
        export_onnx(a.model, fp32)
    rows = {"fp32": measure(fp32, a)}
    ref = rows["fp32"]["tokens"]
    calib = None
    for v in a.variants.split(","):
        bnb = v in ("nf4", "int8")  # bitsandbytes, measured in PyTorch
        folder = work / (v if bnb else v.replace(":", "-").replace("=", ""))
        if not (folder / ("tinyml_model.json" if bnb else META)).is_file():
            t = time.time()
            if bnb:
                from tinyml_cli.core.quantize import quantize_bnb
                quantize_bnb(a.model, folder, v)
            else:
                algo, block, *opts = v.split(":")  # ALGORITHM:BLOCK[:b8=lm_head+v_proj][:acc=0][:emb=0]
                opts = dict(o.split("=") for o in opts)
                if algo == "gptq" and calib is None:
                    calib = calibration(fp32, a)
                quantize_onnx(fp32, folder, int(block), algorithm=algo, calibration=list(calib or []),
                              eight_bit=tuple(x for x in opts.get("b8", "").split("+") if x),
                              accuracy_level=int(opts.get("acc", 4)), embeddings=opts.get("emb", "1") == "1")
            (folder / "quantize_seconds").write_text(str(time.time() - t))
        rows[v] = (measure_bnb if bnb else measure)(folder, a, ref) | {
            "quantize_seconds": float((folder / "quantize_seconds").read_text())}
        if not a.json:
            print(v, {k: x for k, x in rows[v].items() if k != "tokens"}, flush=True)
    base = rows["fp32"]
    vs = {v: {"vqa_points": 100 * (r["vqa_accuracy"] - base["vqa_accuracy"]),
              "perplexity_pct": 100 * (r["perplexity"] / base["perplexity"] - 1), "size_ratio": r["bytes"] / base["bytes"]}
          for v, r in rows.items() if v != "fp32"}
    for r in rows.values():
        r.pop("tokens")
    out = {"benchmark": "int4_quality", "model": a.model, "held_out": a.data, "prompts": a.prompts,
           "new_tokens": a.new_tokens, "variants": rows, "vs_fp32": vs}
    print(json.dumps(out, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
