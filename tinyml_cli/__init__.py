"""tinyml: post-train small multimodal LLMs and ship them to consumer GPUs and CPUs."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user (flag, recipe, data, path): reported as one line, exit code 2."""
