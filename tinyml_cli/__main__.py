"""`python -m tinyml_cli` is the `tinyml` command."""

from .cli import main

main()
