"""Terminal output: rich progress bars, the end-of-run summary table, and the one `--json` object.

With `--json`, everything for people goes to stderr so that stdout holds exactly one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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


class _Counts(ProgressColumn):
    """`done/total` once the total is known; before that the phase the command is in (its status line)."""

    def render(self, task):
        from rich.text import Text
        if task.total is None:
            return Text(task.fields.get("status", ""), style="italic")
        return Text(f"{task.completed:,.0f}/{task.total:,.0f}")


class _Eta(ProgressColumn):
    def render(self, task):
        from rich.text import Text
        return Text("") if task.total is None else Text(f"ETA {TimeRemainingColumn().render(task)}")


@contextlib.contextmanager
def training_bar(con: Console, title: str):
    """Yields `update(step, total, loss, tokens_per_s)` driving a bar with loss, tokens/s and ETA; its
    `update.status(text)` says what the command is doing before the first step (loading, encoding, ...)."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), _Counts(), TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[tps]}"), TimeElapsedColumn(), _Eta()]
    with Progress(*cols, console=con) as prog:
        task = prog.add_task(title, total=None, loss="", tps="", status="starting")

        def update(step, total, loss, tps):
            prog.update(task, completed=step, total=total, loss=f"loss {loss:.4f}", tps=f"{tps:,.0f} tok/s")
        update.status = lambda text: prog.update(task, status=text)
        yield update


@contextlib.contextmanager
def count_bar(con: Console, title: str):
    """Yields `update(done, total)` for work counted in items (evaluation, data building); `update.status(text)`
    as for training_bar."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), _Counts(), TimeElapsedColumn(), _Eta()]
    with Progress(*cols, console=con) as prog:
        task = prog.add_task(title, total=None, status="starting")

        def update(done, total):
            prog.update(task, completed=done, total=total)
        update.status = lambda text: prog.update(task, status=text)
        yield update


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


GIB = 1 << 30


def _gb(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def estimate_report(con, result: dict) -> None:
    """Breakdown, card table and advice as rich tables (people's view of the result)."""
    from rich.table import Table
    m = result["metrics"]
    t = Table(title=f"tinyml estimate ({m['mode']}, {m['device']}, weights {m['dtype']}, peak at {m.get('peak_phase', 'inference')})")
    t.add_column("component"), t.add_column("memory", justify="right")
    for k, v in m["params"].items():
        t.add_row(f"params.{k}", f"{v:,}")
    for k, v in m["breakdown"].items():
        if v:
            t.add_row(k, _gb(v))
        if k == "activations" and m.get("llm_layer_activation_bytes"):
            t.add_row(f"  per LLM layer ({m['image_tokens']} image tokens per record)",
                      _gb(m["llm_layer_activation_bytes"]))
    if m.get("paged_optimizer_bytes"):
        t.add_row("optimizer states, paged (not counted: CPU RAM when the card is full)", _gb(m["paged_optimizer_bytes"]))
    t.add_row("[bold]tensor peak[/bold]", _gb(m["tensor_bytes"]))
    t.add_row("[bold]total[/bold]", _gb(m["total_bytes"]))
    if "measured_bytes" in m:
        t.add_row(f"measured peak ({m['measured_on']})", f"{_gb(m['measured_bytes'])} ({m['rel_error']:+.1%})")
    con.print(t)
    g = Table(title="cards")
    g.add_column("GPU"), g.add_column("GiB", justify="right"), g.add_column("verdict")
    for row in result["gpus"]:
        color = {"fits": "green", "tight": "yellow", "no": "red"}[row["verdict"]]
        g.add_row(row["gpu"], str(row["gib"]), f"[{color}]{row['verdict']}[/{color}]")
    con.print(g)
    if result["advice"] and "gib" in result["advice"][0]:  # training: the fastest setting that fits, per card
        a = Table(title="fastest setting that fits each card (relative speed: tokens/s against the recipe's setting)")
        for col in ("card", "method", "checkpointing", "offload", "optimizer", "in backward", "batch x accum",
                    "estimate", "speed"):
            a.add_column(col, justify="right" if col in ("estimate", "speed") else "left")
        yes = lambda v: "yes" if v else "-"  # noqa: E731
        for r in result["advice"]:
            card = f"{r['gib']:g} GiB" + ("" if r["fits"] else " [red](nothing fits; smallest)[/red]")
            a.add_row(card, r["method"], yes(r["checkpointing"]), yes(r["offload"]), r["optimizer"],
                      yes(r["optimizer_in_backward"]), f"{r['batch']} x {r['grad_accum']}", _gb(r["total_bytes"]),
                      f"{r['relative_speed']:.2f}x")
        con.print(a)
        return
    a = Table(title=f"to fit a {result['target_gib']:g} GiB card")
    a.add_column("change"), a.add_column("new total", justify="right"), a.add_column("verdict")
    for row in result["advice"]:
        a.add_row(row["change"], _gb(row["total_bytes"]), row["verdict"])
    con.print(a)


def runs_table(summaries: list[dict]):
    """The compact terminal summary: one row per run."""
    from rich.table import Table
    cols = [("run", "run"), ("command", "command"), ("steps", "steps"), ("loss_first", "loss first"),
            ("loss_last", "loss last"), ("tokens_per_s", "tok/s"), ("vqa_accuracy", "eval acc"),
            ("estimate_gib", "est. GiB")]
    cols = [(k, h) for k, h in cols if any(k in s for s in summaries)]
    table = Table(title="runs", header_style="bold")
    for _, h in cols:
        table.add_column(h)
    for s in summaries:
        table.add_row(*[f"{s[k]:.4g}" if isinstance(s.get(k), float) else str(s.get(k, "")) for k, _ in cols])
    return table


def recipes_table(found: list[dict]):
    table = Table(title="shipped recipes (use with -c NAME)", header_style="bold")
    table.add_column("name")
    table.add_column("runs with")
    for r in found:
        table.add_row(r["name"], r["command"])
    return table


def problems(con: Console, found: list[str]) -> None:
    """One red line per problem of a data set."""
    from rich.markup import escape
    for p in found:
        con.print(f"[red]x[/red] {escape(p)}")


def demo_table(con: Console, before: dict, after: dict) -> None:
    """Held-out accuracy per question type after pretrain-align and after sft."""
    table = Table(title="held-out accuracy: after pretrain-align (before sft) vs after sft")
    for col in ("question type", "before", "after"):
        table.add_column(col)
    for k in after["vqa_accuracy_by_type"]:
        table.add_row(k, f"{before['vqa_accuracy_by_type'].get(k, 0):.3f}", f"{after['vqa_accuracy_by_type'][k]:.3f}")
    table.add_row("[bold]overall", f"{before['vqa_accuracy']:.3f}", f"[bold]{after['vqa_accuracy']:.3f}")
    table.add_row("POPE F1", f"{before.get('pope', {}).get('f1', 0):.3f}", f"{after.get('pope', {}).get('f1', 0):.3f}")
    con.print(table)


def env_report(con: Console, result: dict) -> None:
    """`tinyml env` for people: one row per version and per fact about the machine, ready to paste."""
    table = Table(title="tinyml env", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for k, v in result["versions"].items():
        table.add_row(k, v or "[dim]not installed[/dim]")
    acc, m = result["accelerators"], result["machine"]
    table.add_row("CUDA", f"yes (CUDA {acc.get('cuda_version')}, bf16 {'yes' if acc.get('bf16') else 'no'})"
                  if acc.get("cuda") else "no")
    for d in acc.get("devices", []):
        table.add_row(f"  cuda:{d['index']}", f"{d['name']}, {_gb(d['memory_bytes'])}, compute {d['capability']}")
    table.add_row("MPS (Apple)", "yes" if acc.get("mps") else "no")
    table.add_row("platform", m["platform"])
    table.add_row("CPUs", f"{m['cpu_count']} ({m['processor']}; torch uses {acc.get('cpu_threads', '-')} threads)")
    table.add_row("memory", f"{_gb(m['memory_bytes'])} ({_gb(m['memory_available_bytes'])} available)")
    table.add_row("onnxruntime providers", ", ".join(m["onnxruntime_providers"]) or "-")
    con.print(table)


def _prompt_lines(prompt: str):
    """Lines typed by the user (the prompt shown only at a terminal); ends at EOF."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


def chat(session, con: Console) -> None:
    """The terminal conversation: each answer streamed to stdout as it is decoded; notes and errors on stderr.
    A bad image or a conversation that no longer fits is one red line, and the conversation goes on."""
    from rich.markup import escape

    from . import UserError
    con.print(f"[dim]chat with {escape(str(session.bot.folder))} ({session.bot.kind}): /image PATH, /reset, "
              f"/exit or Ctrl-D[/dim]")
    if session.pending:
        con.print(f"[dim]{escape(str(session.pending[0]))} goes with your first message[/dim]")

    def out(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    for line in _prompt_lines("you> "):
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                note = session.command(text)
                if note is None:
                    break
                con.print(f"[dim]{escape(note)}[/dim]")
                continue
            session.ask(text, on_text=out)
            out("\n")
        except UserError as e:
            con.print(f"[red]error:[/red] {escape(str(e))}")


def serving(con: Console, model_id: str, kind: str, host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    con.print(f"serving [bold]{model_id}[/bold] ({kind}) at http://{shown}:{port}/v1 "
              f"(chat/completions, models); Ctrl-C stops")
