"""env: the versions and the machine a bug report needs (Python, torch and its accelerators, the libraries, memory)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

# The distributions tinyml runs on, by the name pip knows them by.
PACKAGES = ("tinyml-cli", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "onnxruntime", "onnx",
            "tokenizers", "safetensors", "numpy", "pillow", "datasets", "starlette", "uvicorn")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memory() -> dict:
    """Total and available RAM in bytes (psutil comes with accelerate; sysconf where it is missing)."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        return {"total": vm.total, "available": vm.available}
    except ImportError:
        try:
            return {"total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "available": None}
        except (ValueError, OSError, AttributeError):
            return {"total": None, "available": None}


def _accelerators() -> dict:
    """torch's view: CUDA (each device's name, memory and compute capability) and Apple MPS."""
    try:
        import torch
    except ImportError:
        return {"torch": False, "cuda": False, "mps": False, "devices": []}
    cuda = torch.cuda.is_available()
    devices = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": p.name, "memory_bytes": p.total_memory,
                        "capability": f"{p.major}.{p.minor}"})
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"torch": True, "cuda": cuda, "cuda_version": torch.version.cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "mps": mps, "devices": devices, "cpu_threads": torch.get_num_threads()}


def _onnx_providers() -> list[str]:
    try:
        import onnxruntime
        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def run_env() -> dict:
    """`tinyml env`: one JSON-able summary of this machine and install."""
    versions = {"python": platform.python_version(), **{d: _version(d) for d in PACKAGES}}
    acc = _accelerators()
    mem = _memory()
    machine = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
               "memory_bytes": mem["total"], "memory_available_bytes": mem["available"],
               "onnxruntime_providers": _onnx_providers()}
    return {"command": "env", "output_dir": None, "artifacts": {},
            "metrics": {"cuda_devices": len(acc["devices"]), "cpu_count": os.cpu_count()},
            "versions": versions, "accelerators": acc, "machine": machine}
