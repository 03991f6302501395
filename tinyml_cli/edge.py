"""The edge flow: export -> ONNX greedy parity -> int4 -> eval -> hf-llava logits, as demo metrics."""

from __future__ import annotations

from pathlib import Path


def torch_greedy_tokens(model, examples: list, max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """PyTorch greedy tokens of each prompt (as `evaluate.answers_for` makes them), up to and including EOS."""
    import torch

    from .data import Collator, ImageLoader
    model.eval()
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor), left_pad=True)
    eos = model.tokenizer.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    found = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[i] for i in idx])
        batch.pop("labels")
        with torch.no_grad():
            new = model.generate(**batch, max_new_tokens=max_new_tokens)
        for i, seq in zip(idx, new.tolist()):
            found[i] = seq[:seq.index(eos) + 1] if eos in seq else seq
    return [found[i] for i in range(len(examples))]


def edge_demo_metrics(model_dir: str | Path, eval_file: str | Path, out_dir: str | Path, cfg=None,
                      block_size: int = 32, symmetric: bool = False, llava_prompts: int = 16) -> dict:
    """Export a trained model and measure what the edge path keeps, on the held-out prompts of `eval_file`:

    - `onnx_greedy_match`: fraction of prompts whose fp32 ONNX greedy tokens equal PyTorch's;
    - `int4_size_ratio`: bytes of the int4 export over the fp32 export (all graphs);
    - `vqa_accuracy_torch` / `vqa_accuracy_onnx` / `vqa_accuracy_int4`: held-out accuracy of each;
    - `hf_llava_max_logit_diff`: largest logit difference of the transformers LLaVA checkpoint (MLP connectors).
    `cfg` is the run's config (its `gen.max_new_tokens`, `data.max_length`, `data.system_prompt` are used; greedy
    whatever `gen.temperature` says). Writes `onnx/`, `onnx-int4/` and `hf-llava/` under out_dir.
    """
    import time

    from .config import load_config
    from .evaluate import eval_examples, score
    from .export import export_hf_llava, export_onnx, llava_max_logit_diff, load_merged
    from .onnx_runner import OnnxLMM, greedy_tokens
    from .quantize import quantize_onnx
    t0 = time.time()
    cfg = cfg or load_config(None)
    cfg.data.eval = str(eval_file)
    out = Path(out_dir)
    n_new = cfg.gen.max_new_tokens

    model = load_merged(model_dir)
    examples = eval_examples(model, cfg.data.eval, cfg)
    ref = torch_greedy_tokens(model, examples, n_new, cfg.gen.batch_size)

    def accuracy(tokens, decode) -> float:  # greedy answers scored like `tinyml eval`
        return score(examples, [decode(t, skip_special_tokens=True).strip() for t in tokens])["vqa_accuracy"]
    torch_acc = accuracy(ref, model.tokenizer.decode)

    export_onnx(model_dir, out / "onnx")
    fp32 = OnnxLMM(out / "onnx")
    onnx_tokens = greedy_tokens(fp32, examples, n_new, cfg.gen.batch_size)
    match = sum(a == b for a, b in zip(ref, onnx_tokens)) / len(ref)
    onnx_acc = accuracy(onnx_tokens, fp32.tokenizer.decode)

    q = quantize_onnx(out / "onnx", out / "onnx-int4", block_size=block_size, symmetric=symmetric)
    int4 = OnnxLMM(out / "onnx-int4")
    int4_tokens = greedy_tokens(int4, examples, n_new, cfg.gen.batch_size)
    int4_acc = accuracy(int4_tokens, int4.tokenizer.decode)

    metrics = {"onnx_greedy_match": match, "onnx_prompts": len(ref), "int4_size_ratio": q["size_ratio"],
               "int4_size_ratio_by_graph": q["size_ratio_by_graph"], "onnx_fp32_bytes": q["bytes_before"]["total"],
               "onnx_int4_bytes": q["bytes_after"]["total"], "vqa_accuracy_torch": torch_acc,
               "vqa_accuracy_onnx": onnx_acc, "vqa_accuracy_int4": int4_acc,
               "int4_greedy_match": sum(a == b for a, b in zip(ref, int4_tokens)) / len(ref)}
    if model.spec["connector"] in ("linear", "mlp2x_gelu"):
        export_hf_llava(model_dir, out / "hf-llava")
        metrics["hf_llava_max_logit_diff"] = llava_max_logit_diff(model_dir, out / "hf-llava",
                                                                  examples[:llava_prompts])
    metrics["edge_seconds"] = time.time() - t0
    return metrics


def run_export(model_dir: str | Path, out: str | Path, fmt: str = "onnx", dtype: str = "fp32") -> dict:
    """`tinyml export`: the JSON summary of an ONNX or hf-llava export."""
    import time

    from . import UserError
    from .export import export_hf_llava, export_onnx
    from .model import is_model_dir
    t0 = time.time()
    if not is_model_dir(model_dir):
        raise UserError(f"not a tinyml model folder (no tinyml_model.json): {model_dir}")
    if fmt == "onnx":
        sizes = export_onnx(model_dir, out, dtype)
        metrics = {"bytes": sizes, "dtype": dtype}
        artifacts = {k: str(Path(out) / f"{k}.onnx") for k in sizes if k != "total"}
    elif fmt == "hf-llava":
        if dtype != "fp32":
            raise UserError("--format hf-llava saves fp32 weights (pass dtype= to from_pretrained to cast)")
        metrics = export_hf_llava(model_dir, out)
        artifacts = {"model": str(out)}
    else:
        raise UserError(f"--format must be onnx or hf-llava, got '{fmt}'")
    metrics["seconds"] = time.time() - t0
    return {"command": "export", "output_dir": str(out), "metrics": metrics, "artifacts": artifacts, "format": fmt}


def run_quantize(src: str | Path, out: str | Path, method: str, block_size: int, symmetric: bool,
                 data: str | None, cfg, accuracy_level: int = 4) -> dict:
    """`tinyml quantize`: sizes before and after and, given held-out data, the accuracy of both."""
    import time
    t0 = time.time()
    metrics: dict = {"method": method}
    if data:
        cfg.data.eval = data
    if method == "int4":  # torch-free: the ONNX quantizer and runner
        from .onnx_runner import run_eval_onnx
        from .quantize import quantize_onnx
        metrics |= quantize_onnx(src, out, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)
        if data:
            metrics["vqa_accuracy_before"] = run_eval_onnx(src, cfg)["metrics"]["vqa_accuracy"]
            metrics["vqa_accuracy_after"] = run_eval_onnx(out, cfg)["metrics"]["vqa_accuracy"]
    else:
        from .evaluate import run_eval
        from .quantize import quantize_bnb
        metrics |= quantize_bnb(src, out, method)
        if data:
            metrics["vqa_accuracy_before"] = run_eval(str(src), cfg, None)["metrics"]["vqa_accuracy"]
            metrics["vqa_accuracy_after"] = run_eval(str(out), cfg, None)["metrics"]["vqa_accuracy"]
    if data:
        metrics["vqa_accuracy_change"] = metrics["vqa_accuracy_after"] - metrics["vqa_accuracy_before"]
    metrics["seconds"] = time.time() - t0
    return {"command": "quantize", "output_dir": str(out), "metrics": metrics, "artifacts": {"model": str(out)}}
