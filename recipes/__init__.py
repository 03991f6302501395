"""YAML recipes shipped with tinyml (read with importlib.resources)."""
