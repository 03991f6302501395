"""quantize: an ONNX export to int4 (torch-free) or a model folder to bitsandbytes NF4 / FP4 / int8, with the
held-out accuracy before and after."""


from __future__ import annotations

import shutil
from pathlib import Path

METHODS = ("int4", "nf4", "fp4", "int8")


def parse_eight_bit(text: str | None) -> tuple[str, ...]:
    """`--eight-bit PROJ,...` as checked projection names: None (not given) is the default; '' or none is 4 bits
    throughout."""
    from ..edge.int4 import EIGHT_BIT_DEFAULT, check_eight_bit
    names = EIGHT_BIT_DEFAULT if text is None else () if text.strip() in ("", "none") else tuple(
        p.strip() for p in text.split(","))
    check_eight_bit(names)
    return names


def run_quantize(src: str | Path, out: str | Path, method: str, block_size: int, symmetric: bool,
                 data: str | None, cfg, accuracy_level: int = 4, overwrite: bool = False, before_work=None,
                 algorithm: str = "rtn", eight_bit: str | None = None) -> dict:
    """`tinyml quantize`: sizes before and after and, given held-out data, the accuracy of both. The arguments,
    the source and the held-out data are checked before `before_work()` and any quantization, and a folder
    holding files needs `overwrite`. `eight_bit`: the `--eight-bit` text (parse_eight_bit)."""
    import time

    from .. import UserError
    from ..edge.runner import META
    from .checks import check_model_dir, check_source
    from .outputs import prepare_output, removed_if_left_empty
    t0 = time.time()
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "int4" and not (Path(src) / META).is_file():
        raise UserError(f"int4 quantizes an ONNX export (`tinyml export`; no {META} in {src}); "
                        f"for a model folder use --method nf4, fp4 or int8")
    if method == "int4" and algorithm not in ("rtn", "kquant", "hqq"):
        raise UserError(f"--algorithm must be rtn, kquant or hqq, got '{algorithm}' (gptq needs calibration records: "
                        "benchmarks/int4_quality.py runs it)")
    if method == "int4":
        eight_bit = parse_eight_bit(eight_bit)
    if method != "int4":
        check_model_dir(src, "--method nf4 / fp4 / int8 quantizes a tinyml model folder: ")
    if data:
        check_source("--data", data)
        cfg.data.eval = data
    prepare_output(out, overwrite=overwrite, marker="", holds="files", inputs=[src])
    if before_work:
        before_work()
    metrics: dict = {"method": method}
    from .eval import run_eval
    with removed_if_left_empty(out):
        if method == "int4":  # torch-free: the ONNX quantizer and runner
            from ..edge.int4 import quantize_onnx
            metrics |= quantize_onnx(src, out, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
                                     algorithm=algorithm, eight_bit=eight_bit)
            if (Path(src) / "config.yaml").is_file():  # the run's settings travel with the export
                shutil.copy(Path(src) / "config.yaml", Path(out) / "config.yaml")
            if data:
                metrics["vqa_accuracy_before"] = run_eval(None, cfg, None, onnx=src)["metrics"]["vqa_accuracy"]
                metrics["vqa_accuracy_after"] = run_eval(None, cfg, None, onnx=out)["metrics"]["vqa_accuracy"]
        else:
            from ..core.quantize import quantize_bnb
            metrics |= quantize_bnb(src, out, method)
            if data:
                metrics["vqa_accuracy_before"] = run_eval(str(src), cfg, None)["metrics"]["vqa_accuracy"]
                metrics["vqa_accuracy_after"] = run_eval(str(out), cfg, None)["metrics"]["vqa_accuracy"]
    if data:
        metrics["vqa_accuracy_change"] = metrics["vqa_accuracy_after"] - metrics["vqa_accuracy_before"]
    metrics["seconds"] = time.time() - t0
    return {"command": "quantize", "output_dir": str(out), "metrics": metrics, "artifacts": {"model": str(out)}}
