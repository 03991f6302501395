"""estimate: the `tinyml estimate` result for a recipe (see core/estimate.py for the arithmetic)."""

from __future__ import annotations

from dataclasses import replace

from .. import UserError
from ..core.estimate import (
    ADVICE_GIB,
    Setting,
    advice,
    dtypes,
    estimate,
    gpu_table,
    infer_advice,
    measure,
    meta_model,
)


def run_estimate(cfg, device: str = "auto", gib: float = 24, do_measure: bool = False, infer: bool = False,
                 context: int = 2048, kv_bytes: int = 2, image_size: int = 0) -> dict:
    """The `tinyml estimate` result: counts, breakdown, card table, advice, and the measured peak if asked."""
    setting = Setting(device=device, mode="infer" if infer else "train", batch=cfg.train.batch_size,
                      seq=cfg.data.max_length, checkpointing=cfg.train.gradient_checkpointing,
                      optimizer=cfg.train.optimizer, grad_accum=cfg.train.grad_accum,
                      in_backward=cfg.train.optimizer_in_backward, chunked_loss=cfg.train.chunked_loss,
                      offload=cfg.train.offload_activations, context=context, kv_bytes=kv_bytes,
                      image_size=image_size)
    if setting.device == "auto":
        import torch
        setting = replace(setting, device="cuda" if torch.cuda.is_available() else "cpu")
    if setting.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda, cpu or auto, got '{setting.device}'")
    wdtype, _ = dtypes(cfg, setting.device)
    meta = meta_model(cfg, wdtype)
    e = estimate(cfg, setting, meta)
    metrics = {"params": e.params, "total_bytes": e.total_bytes, "tensor_bytes": e.tensor_bytes,
               "breakdown": e.breakdown, **e.detail}
    if setting.mode == "infer":
        tips = infer_advice(cfg, setting, gib, meta)
    else:  # the fastest setting that fits, per card size (and the --gpu one)
        tips = advice(cfg, setting, sorted({*ADVICE_GIB, gib}), meta)
    result = {"command": "estimate", "output_dir": None, "metrics": metrics, "artifacts": {},
              "gpus": gpu_table(e.total_bytes), "advice": tips, "target_gib": gib}
    if do_measure:
        if setting.mode != "train":
            raise UserError("--measure runs a training step; it does not apply to --infer")
        if setting.image_size:
            raise UserError("--measure runs at the vision config's resolution; leave out --image-size")
        m = measure(cfg, device=setting.device)
        metrics.update(measured_bytes=m["measured_bytes"],
                       rel_error=e.tensor_bytes / m["measured_bytes"] - 1, measured_on=m["device"])
    return result
