"""export: a model folder to ONNX (for onnxruntime and the edge runner), to GGUF (llama.cpp: the LLM and an mmproj)
or to a transformers LLaVA checkpoint."""


from __future__ import annotations

import json
import shutil
from pathlib import Path

FORMATS, DTYPES = ("onnx", "gguf", "hf-llava"), ("fp32", "fp16")


def run_export(model_dir: str | Path, out: str | Path, fmt: str = "onnx", dtype: str = "fp32", overwrite: bool = False,
               before_work=None, gguf_type: str = "f16") -> dict:
    """`tinyml export`: the JSON summary of an ONNX, GGUF or hf-llava export. Everything that can be wrong with the
    arguments is checked before `before_work()` and the export run, and a folder holding files needs `overwrite`."""
    import time

    from .. import UserError
    from .checks import check_model_dir
    from .outputs import prepare_output, removed_if_left_empty
    t0 = time.time()
    check_model_dir(model_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format must be onnx, gguf or hf-llava, got '{fmt}'")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be fp32 or fp16, got '{dtype}'")
    if fmt == "hf-llava" and dtype != "fp32":
        raise UserError("--format hf-llava saves fp32 weights (pass dtype= to from_pretrained to cast)")
    if fmt == "gguf":
        from ..core.gguf_export import GGUF_TYPES, check_gguf_exportable
        if gguf_type not in GGUF_TYPES:
            raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
        check_gguf_exportable(model_dir)
    prepare_output(out, overwrite=overwrite, marker="", holds="files", inputs=[model_dir])
    if before_work:
        before_work()
    from ..core.export import export_hf_llava, export_onnx
    with removed_if_left_empty(out):
        if fmt == "onnx":
            sizes = export_onnx(model_dir, out, dtype)
            meta = json.loads((Path(out) / "tinyml_onnx.json").read_text())
            # shared: the decoder written by onnxruntime-genai's builder (fused); concat: traced by torch.onnx
            metrics = {"bytes": sizes, "dtype": dtype, "kv_cache": meta["kv_cache"]}
            if meta.get("builder_failed"):
                metrics["builder_failed"] = meta["builder_failed"]
            artifacts = {k: str(Path(out) / f"{k}.onnx") for k in sizes if k != "total"}
            if (Path(model_dir) / "config.yaml").is_file():  # eval / chat / serve of the export take the run's settings
                shutil.copy(Path(model_dir) / "config.yaml", Path(out) / "config.yaml")
        elif fmt == "gguf":
            from ..core.gguf_export import export_gguf
            metrics = {"bytes": export_gguf(model_dir, out, gguf_type), "gguf_type": gguf_type}
            artifacts = {"model": str(Path(out) / "model.gguf"), "mmproj": str(Path(out) / "mmproj.gguf")}
        else:
            metrics = export_hf_llava(model_dir, out)
            artifacts = {"model": str(out)}
    metrics["seconds"] = time.time() - t0
    return {"command": "export", "output_dir": str(out), "metrics": metrics, "artifacts": artifacts, "format": fmt}
