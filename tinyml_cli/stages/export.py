"""export: a model folder to ONNX (for onnxruntime and the edge runner) or to a transformers LLaVA checkpoint."""


from __future__ import annotations

from pathlib import Path


def run_export(model_dir: str | Path, out: str | Path, fmt: str = "onnx", dtype: str = "fp32") -> dict:
    """`tinyml export`: the JSON summary of an ONNX or hf-llava export."""
    import time

    from .. import UserError
    from ..core.export import export_hf_llava, export_onnx
    from ..core.model import is_model_dir
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
