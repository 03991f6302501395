"""Terminal output: rich progress bars, the end-of-run summary table, and the one `--json` object.

With `--json`, everything for people goes to stderr so that stdout holds exactly one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def console(json_mode: bool) -> Console:
    return Console(stderr=json_mode, highlight=False)


def quiet_libraries() -> None:
    """Hide the libraries' own progress bars and warnings: tinyml reports progress itself."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import logging
    logging.getLogger("accelerate").setLevel(logging.ERROR)


@contextlib.contextmanager
def training_bar(con: Console, title: str):
    """Yields `update(step, total, loss, tokens_per_s)` driving a bar with loss, tokens/s and ETA."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=con) as prog:
        task = prog.add_task(title, total=None, loss="-", tps="-")

        def update(step, total, loss, tps):
            prog.update(task, completed=step, total=total, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
        yield update


@contextlib.contextmanager
def count_bar(con: Console, title: str):
    """Yields `update(done, total)` for work counted in items (evaluation, data building)."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=con) as prog:
        task = prog.add_task(title, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _flat(v, f"{prefix}{k}.")
        elif v is not None:
            rows.append((f"{prefix}{k}", v))
    return rows


def summary(con: Console, result: dict) -> None:
    table = Table(title=f"tinyml {result.get('command', '')}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for k in ("trainable_params", "total_params"):
        if k in result:
            table.add_row(k, _fmt(result[k]))
    for k, v in _flat(result.get("metrics", {})):
        table.add_row(k, _fmt(v))
    for k, v in (result.get("artifacts") or {}).items():
        table.add_row(f"[dim]{k}[/dim]", str(v))
    con.print(table)


def emit(result: dict, json_mode: bool) -> None:
    """The end of every command: a table for people, and with --json one JSON object on stdout."""
    con = console(json_mode)
    summary(con, result)
    if json_mode:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
