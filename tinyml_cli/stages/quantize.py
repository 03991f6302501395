"""quantize: an ONNX export to int4 (torch-free) or a model folder to bitsandbytes NF4 / FP4 / int8, with the
held-out accuracy before and after."""


from __future__ import annotations

from pathlib import Path


def run_quantize(src: str | Path, out: str | Path, method: str, block_size: int, symmetric: bool,
                 data: str | None, cfg, accuracy_level: int = 4) -> dict:
    """`tinyml quantize`: sizes before and after and, given held-out data, the accuracy of both."""
    import time
    t0 = time.time()
    metrics: dict = {"method": method}
    if data:
        cfg.data.eval = data
    if method == "int4":  # torch-free: the ONNX quantizer and runner
        from ..edge.int4 import quantize_onnx
        from .eval import run_eval
        metrics |= quantize_onnx(src, out, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)
        if data:
            metrics["vqa_accuracy_before"] = run_eval(None, cfg, None, onnx=src)["metrics"]["vqa_accuracy"]
            metrics["vqa_accuracy_after"] = run_eval(None, cfg, None, onnx=out)["metrics"]["vqa_accuracy"]
    else:
        from ..core.quantize import quantize_bnb
        from .eval import run_eval
        metrics |= quantize_bnb(src, out, method)
        if data:
            metrics["vqa_accuracy_before"] = run_eval(str(src), cfg, None)["metrics"]["vqa_accuracy"]
            metrics["vqa_accuracy_after"] = run_eval(str(out), cfg, None)["metrics"]["vqa_accuracy"]
    if data:
        metrics["vqa_accuracy_change"] = metrics["vqa_accuracy_after"] - metrics["vqa_accuracy_before"]
    metrics["seconds"] = time.time() - t0
    return {"command": "quantize", "output_dir": str(out), "metrics": metrics, "artifacts": {"model": str(out)}}
