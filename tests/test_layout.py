"""The layout's rules, read from the source: what each folder of the package may import (module-level and
function-level imports alike), no cycles, one trainable set-up, and printing only in cli / ui / config."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tinyml_cli"
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}


def _module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PKG) -> set[str]:
    """Every module a file imports, anywhere in it, as absolute names (relative imports resolved)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import ui` imports a module
    return out


def graph(root: Path = PKG) -> dict[str, set[str]]:
    """Package module -> the package modules it imports."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {t for t in imports_of(p, root) if t in files and t != m} for m, p in files.items()}


def third_party(root: Path = PKG) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {t.split(".")[0] for t in imports_of(p, root)} - {"tinyml_cli"} for m, p in files.items()}


def reach(g: dict, m: str) -> set[str]:
    seen, todo = set(), [m]
    while todo:
        for t in g[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def folder(m: str) -> str:
    parts = m.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(g: dict) -> list[set[str]]:
    return [c for c in ({m} | {t for t in reach(g, m) if m in reach(g, t)} for m in g) if len(c) > 1]


def broken_rules(g: dict, ext: dict) -> list[str]:
    """What breaks the layout's import rules (empty when they hold)."""
    bad = []
    for m in g:
        f = folder(m)
        if f in ("records", "edge"):
            heavy = {x for t in {m} | reach(g, m) for x in ext[t] & HEAVY}
            upward = {t for t in reach(g, m) if folder(t) in ("core", "stages", "demo", "cli", "ui")}
            if heavy or upward:
                bad.append(f"{m} ({f}/ stays torch-free and below core) reaches {sorted(heavy | upward)}")
        if f == "core":
            up = {t for t in g[m] if folder(t) in ("stages", "demo", "cli", "ui")}
            if up:
                bad.append(f"{m} (core/) imports {sorted(up)}")
        if f != "demo" and m != "tinyml_cli.cli" and any(folder(t) == "demo" for t in g[m]):
            bad.append(f"{m} imports demo code")
        if m.endswith(".losses") and (g[m] or ext[m] - {"torch", "__future__"}):
            bad.append(f"{m} imports {sorted(g[m] | ext[m])}: losses import only torch")
    bad += [f"import cycle: {sorted(c)}" for c in cycles(g)]
    return bad


def test_the_package_keeps_the_import_rules():
    g = graph()
    assert {folder(m) for m in g} >= {"records", "edge", "core", "stages", "demo"}
    assert broken_rules(g, third_party()) == []


@pytest.mark.parametrize("module, line, rule", [
    ("records/sources.py", "import torch", "stays torch-free"),
    ("edge/runner.py", "from ..core import model", "stays torch-free"),
    ("core/loop.py", "from ..stages import sft", "(core/) imports"),
    ("core/losses.py", "from ..records import scoring", "losses import only torch"),
    ("records/encoder.py", "from . import conversations", "import cycle"),
    ("stages/dpo.py", "from ..demo import synth", "imports demo code"),
])
def test_each_rule_fails_when_broken(tmp_path, module, line, rule):
    """The check is not vacuous: one offending import in a copy of the package breaks exactly that rule."""
    import shutil
    copy = tmp_path / "tinyml_cli"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    f = copy / module
    f.write_text(f.read_text() + f"\n\ndef _broken():\n    {line}\n")
    assert broken_rules(graph(PKG), third_party(PKG)) == []
    assert any(rule in b for b in broken_rules(graph(copy), third_party(copy))), (module, line)


def test_every_training_stage_gets_its_model_from_the_one_trainable_setup():
    g = graph()
    for stage in ("sft", "reward", "dpo", "ppo", "grpo", "kto"):
        m = f"tinyml_cli.stages.{stage}"
        assert "tinyml_cli.core.trainable.setup_model" in imports_of(PKG / "stages" / f"{stage}.py"), stage
        assert not {"tinyml_cli.core.model.build_model"} & imports_of(PKG / "stages" / f"{stage}.py"), stage
        assert "tinyml_cli.core.loop" in g[m], stage  # and trains on the one loop


def test_only_cli_ui_and_config_print():
    printing = []
    for p in PKG.rglob("*.py"):
        if _module_name(p) in ("tinyml_cli.cli", "tinyml_cli.ui", "tinyml_cli.config"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in ("print", "echo", "secho") or (isinstance(f, ast.Attribute) and f.attr == "write"
                                                            and isinstance(f.value, ast.Attribute) and f.value.attr in ("stdout", "stderr")):
                    printing.append(f"{_module_name(p)}:{node.lineno}")
    assert printing == []
