"""tinyml: post-train small multimodal LLMs and ship them to consumer GPUs and CPUs."""

__version__ = "0.1.0"
IMAGE_TOKEN = "<image>"  # here, not in model.py, so that torch-free modules (the ONNX runner) can use it


class UserError(Exception):
    """Bad input from the user (flag, recipe, data, path): reported as one line, exit code 2."""
