"""The recipes shipped inside the package (`tinyml_cli.recipes`): listed with the command each opens with."""

from __future__ import annotations

from importlib.resources import files

from . import UserError


def _recipe_files() -> dict:
    return {f.name[:-5]: f for f in sorted(files("tinyml_cli.recipes").iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml") and f.is_file()}


def _opening(text: str) -> tuple[str, str]:
    """(what it is, the command that runs it) from a recipe's opening comment block."""
    comments = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comments.append(" ".join(line.lstrip("#").split()))
    commands = [c for c in comments if c.startswith("tinyml ")]
    # the line that runs this recipe names it with -c; the lines before it may prepare data
    command = next((c for c in commands if " -c " in c), commands[0] if commands else "")
    return (comments[0] if comments else ""), command


def shipped_recipes() -> list[dict]:
    out = []
    for name, f in _recipe_files().items():
        about, command = _opening(f.read_text(encoding="utf-8"))
        out.append({"name": name, "about": about, "command": command})
    return out


def recipe_text(name: str) -> str:
    found = _recipe_files()
    key = name[:-5] if name.endswith(".yaml") else name
    if key not in found:
        raise UserError(f"no shipped recipe '{name}' (shipped: {', '.join(found)})")
    return found[key].read_text(encoding="utf-8")
