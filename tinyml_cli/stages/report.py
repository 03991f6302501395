"""report: matplotlib figures and one self-contained HTML page from run folders.

A run folder may hold `metrics.jsonl` (a training command's log), `eval_metrics.json` (`tinyml eval -o`, or the
demo's evaluations) and `estimate.json` (`tinyml estimate`). Every numeric key of metrics.jsonl other than the
common ones (loss, lr, grad norm, tokens/s) is an objective's own metric and gets a panel of its own, so
preference runs' reward margins, chosen / rejected rewards and KL are drawn whatever objective wrote them.
The page embeds its figures as base64 data, so it opens anywhere with no network.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import UserError

COMMON = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s")


RUN_FILES = ("metrics.jsonl", "eval_metrics.json", "estimate.json")


GPU_GB = (8, 12, 16, 24, 40, 48, 80)  # common card sizes the memory figure marks


GIB = 1024 ** 3


@dataclass
class Run:
    name: str
    path: Path
    command: str
    history: list[dict]  # metrics.jsonl, one record per step (the last one wins when a resume logged a step again)
    eval: dict | None
    estimate: dict | None
    broken_lines: int  # lines that are not JSON objects (a run killed mid-write leaves half a line)


def run_folders(paths: list[Path]) -> list[Path]:
    """The folders to report on: each path that holds a run file, else its sub-folders that do."""
    out = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"not a folder: {p}")
        if any((p / f).is_file() for f in RUN_FILES):
            out.append(p)
            continue
        subs = [d for d in sorted(p.iterdir()) if d.is_dir() and any((d / f).is_file() for f in RUN_FILES)]
        if not subs:
            raise UserError(f"{p} holds no run: none of {', '.join(RUN_FILES)} in it or its sub-folders")
        out += subs
    return out


def short_names(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell the runs apart (sft, demo/sft, ...)."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _json_file(p: Path) -> dict | None:
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def read_run(path: Path, name: str) -> Run:
    by_step, broken = {}, 0
    log = path / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                broken += 1
                continue
            by_step[rec["step"]] = rec
    command = ""
    cfg = path / "config.yaml"
    if cfg.is_file():
        import yaml
        try:
            command = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("command", "")
        except yaml.YAMLError:
            pass
    estimate = _json_file(path / "estimate.json")
    if estimate is not None:
        estimate = estimate.get("metrics", estimate)  # the `--json` object of `tinyml estimate`, or its metrics
        command = command or "estimate"
    return Run(name, path, str(command), [by_step[k] for k in sorted(by_step)],
               _json_file(path / "eval_metrics.json"), estimate, broken)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(run: Run, key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in run.history if _number(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


def objective_keys(runs: list[Run]) -> list[str]:
    keys = {k for r in runs for rec in r.history for k, v in rec.items() if _number(v) and k not in COMMON}
    return sorted(keys)


def summarize(run: Run) -> dict:
    """The run's figures for the terminal table and the JSON output."""
    s: dict = {"run": run.name, "command": run.command, "path": str(run.path)}
    steps, loss = series(run, "loss")
    if loss:
        s.update(steps=int(steps[-1]), loss_first=loss[0], loss_last=loss[-1], loss_min=min(loss))
        _, tps = series(run, "tokens_per_s")
        if tps:
            s["tokens_per_s"] = tps[-1]
    if run.eval and _number(run.eval.get("vqa_accuracy")):
        s["vqa_accuracy"] = run.eval["vqa_accuracy"]
    if run.estimate and _number(run.estimate.get("total_bytes")):
        s["estimate_gib"] = run.estimate["total_bytes"] / GIB
    if run.broken_lines:
        s["broken_lines"] = run.broken_lines
    return s


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, n: int, title: str):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _save(fig, plt, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _curve_panel(ax, runs: list[Run], keys: list[str], title: str) -> None:
    values = []
    for r in runs:
        for k in keys:
            x, y = series(r, k)
            if y:
                label = r.name if len(keys) == 1 else f"{r.name} {k.rsplit('/', 1)[-1]}"
                ax.plot(x, y, label=label, linewidth=1.3)
                values += y
    # a loss that falls by orders of magnitude reads better on a log scale
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def training_figure(runs: list[Run], out: Path) -> Path | None:
    """Loss, learning rate, gradient norm and throughput against step, the runs overlaid."""
    names = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens / s"}
    present = [k for k in names if any(series(r, k)[1] for r in runs)]
    if not present:
        return None
    plt = _plt()
    fig, axes = _panels(plt, len(present), "training")
    for ax, k in zip(axes, present):
        _curve_panel(ax, runs, [k], names[k])
    return _save(fig, plt, out)


def objective_figure(runs: list[Run], out: Path) -> Path | None:
    """One panel per objective metric (reward margins, KL, ...); chosen and rejected rewards share a panel."""
    keys = objective_keys(runs)
    if not keys:
        return None
    groups: dict[str, list[str]] = {}
    for k in keys:
        stem, _, leaf = k.rpartition("/")
        title = f"{stem or 'rewards'}: chosen vs rejected" if leaf in ("chosen", "rejected") else k
        groups.setdefault(title, []).append(k)
    plt = _plt()
    fig, axes = _panels(plt, len(groups), "objective metrics")
    for ax, (title, ks) in zip(axes, groups.items()):
        _curve_panel(ax, runs, ks, title)
    return _save(fig, plt, out)


def eval_figure(runs: list[Run], out: Path) -> Path | None:
    """Held-out accuracy per question type, one bar per run."""
    evals = [(r.name, r.eval["vqa_accuracy_by_type"]) for r in runs
             if r.eval and isinstance(r.eval.get("vqa_accuracy_by_type"), dict)]
    if not evals:
        return None
    types = sorted({t for _, by in evals for t in by})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(types) * len(evals) ** 0.5 + 2), 3.8))
    width = 0.8 / len(evals)
    for i, (name, by) in enumerate(evals):
        xs = [j + (i - (len(evals) - 1) / 2) * width for j in range(len(types))]
        ax.bar(xs, [by.get(t, 0.0) for t in types], width, label=name)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("held-out accuracy by question type")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def memory_figure(runs: list[Run], out: Path) -> Path | None:
    """The estimate's memory breakdown as stacked bars, against the common GPU sizes."""
    ests = [(r.name, {k: v for k, v in (r.estimate.get("breakdown") or {}).items() if _number(v)})
            for r in runs if r.estimate and isinstance(r.estimate.get("breakdown"), dict)]
    ests = [(n, b) for n, b in ests if b]
    if not ests:
        return None
    parts = list(dict.fromkeys(k for _, b in ests for k in b))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 2.0 + 0.6 * len(ests)))
    left = [0.0] * len(ests)
    for part in parts:
        gib = [b.get(part, 0) / GIB for _, b in ests]
        ax.barh(range(len(ests)), gib, left=left, label=part)
        left = [a + g for a, g in zip(left, gib)]
    gpus = [g for g in GPU_GB if g <= max(24, max(left) * 1.3)]
    for gb in gpus:
        ax.axvline(gb, color="gray", linestyle="--", linewidth=0.8)
    ax.secondary_xaxis("top").set_xticks(gpus, [f"{g} GB" for g in gpus], fontsize=8)
    ax.set_yticks(range(len(ests)), [n for n, _ in ests])
    ax.set_xlabel("GiB")
    ax.set_title("estimated memory against GPU sizes", pad=8)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, plt, out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _eval_rows(runs: list[Run]) -> tuple[list[str], list[list]]:
    evals = [r for r in runs if r.eval]
    types = sorted({t for r in evals for t in (r.eval.get("vqa_accuracy_by_type") or {})})
    header = ["run", "n", "accuracy", *types, "POPE F1"]
    rows = [[r.name, r.eval.get("n", ""), r.eval.get("vqa_accuracy", ""),
             *[(r.eval.get("vqa_accuracy_by_type") or {}).get(t, "") for t in types],
             (r.eval.get("pope") or {}).get("f1", "")] for r in evals]
    return header, rows


def html_page(runs: list[Run], summaries: list[dict], figures: list[Path]) -> str:
    keys = ["run", "command", "steps", "loss_first", "loss_last", "loss_min", "tokens_per_s", "vqa_accuracy",
            "estimate_gib"]
    keys = [k for k in keys if any(k in s for s in summaries)]
    parts = [f"<h1>tinyml report</h1><p>{len(runs)} run(s), made {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             _table(keys, [[s.get(k, "") for k in keys] for s in summaries])]
    for f in figures:
        data = base64.b64encode(f.read_bytes()).decode("ascii")
        parts.append(f'<h2>{html.escape(f.stem)}</h2><img alt="{html.escape(f.name)}" src="data:image/png;base64,{data}">')
    if any(r.eval for r in runs):
        parts.append("<h2>evaluation</h2>" + _table(*_eval_rows(runs)))
    for r in runs:
        if r.estimate and isinstance(r.estimate.get("breakdown"), dict):
            rows = [[k, v / GIB] for k, v in r.estimate["breakdown"].items() if _number(v)]
            if _number(r.estimate.get("total_bytes")):
                rows.append(["total", r.estimate["total_bytes"] / GIB])
            parts.append(f"<h2>memory estimate: {html.escape(r.name)}</h2>" + _table(["component", "GiB"], rows))
    parts.append("<h2>runs</h2><ul>" + "".join(f"<li>{html.escape(r.name)}: {html.escape(str(r.path))}</li>"
                                               for r in runs) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tinyml report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def make_report(paths: list[Path], out_dir: Path) -> dict:
    """Read the runs, draw the figures, write report.html; returns the JSON summary."""
    folders = run_folders(paths)
    runs = [read_run(p, n) for p, n in zip(folders, short_names(folders))]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [f for f in (training_figure(runs, out_dir / "training.png"),
                           objective_figure(runs, out_dir / "objective.png"),
                           eval_figure(runs, out_dir / "eval.png"),
                           memory_figure(runs, out_dir / "memory.png")) if f is not None]
    summaries = [summarize(r) for r in runs]
    page = out_dir / "report.html"
    page.write_text(html_page(runs, summaries, figures), encoding="utf-8")
    return {"command": "report", "output_dir": str(out_dir), "runs": summaries,
            "metrics": {"runs": len(runs), "figures": len(figures)},
            "artifacts": {"report": str(page), **{f.stem: str(f) for f in figures}}}
