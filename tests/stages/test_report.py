"""tinyml report: figures and a self-contained HTML page from run folders (real and hand-written)."""

import base64
import json

import pytest

from tinyml_cli import UserError
from tinyml_cli.stages.report import (
    make_report,
    objective_keys,
    read_run,
    run_folders,
    short_names,
)


def _write_log(folder, records, command="sft"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(f"command: {command}\n")
    return folder


def _pngs_embedded(out, result):
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        assert base64.b64encode(data).decode() in page  # embedded, so the page needs no other file
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    assert set(result["artifacts"]) == {"report", *(p.stem for p in pngs)}
    return page, {p.stem for p in pngs}


@pytest.mark.slow
def test_report_of_a_tiny_run(tiny_cfg, tmp_path):
    from tinyml_cli.stages.sft import run_sft
    run = tmp_path / "run"
    run_sft(tiny_cfg("train.max_steps=4", "train.log_every=1"), run, "sft")
    (run / "eval_metrics.json").write_text(json.dumps(
        {"vqa_accuracy": 0.25, "n": 4, "vqa_accuracy_by_type": {"color": 0.5, "shape": 0.0}}))
    result = make_report([run], tmp_path / "report")
    page, figures = _pngs_embedded(tmp_path / "report", result)
    assert figures == {"training", "eval"}
    s = result["runs"][0]
    log = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 4 and s["loss_first"] == log[0]["loss"] and s["loss_last"] == log[-1]["loss"]
    assert s["vqa_accuracy"] == 0.25 and "<td>0.25</td>" in page


def test_preference_keys_get_their_own_panels(tmp_path):
    recs = [{"step": s, "loss": 0.7 - 0.01 * s, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 100.0,
             "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s,
             "reward_accuracy": min(1.0, 0.5 + 0.05 * s), "kl": 0.01 * s} for s in range(1, 11)]
    dpo = _write_log(tmp_path / "dpo", recs, "dpo")
    sft = _write_log(tmp_path / "sft", [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 6)])
    runs = [read_run(p, p.name) for p in (dpo, sft)]
    assert objective_keys(runs) == ["kl", "reward_accuracy", "rewards/chosen", "rewards/margins", "rewards/rejected"]
    result = make_report([dpo, sft], tmp_path / "out")
    _, figures = _pngs_embedded(tmp_path / "out", result)
    assert figures == {"training", "objective"}
    assert [r["command"] for r in result["runs"]] == ["dpo", "sft"]


def test_estimate_memory_figure(tmp_path):
    est = tmp_path / "est"
    est.mkdir()
    breakdown = {"weights": 2.2 * 2**30, "gradients": 1.1 * 2**30, "optimizer": 4.4 * 2**30, "activations": 3 * 2**30}
    (est / "estimate.json").write_text(json.dumps(
        {"command": "estimate", "metrics": {"breakdown": breakdown, "total_bytes": sum(breakdown.values())}}))
    result = make_report([est], tmp_path / "out")
    page, figures = _pngs_embedded(tmp_path / "out", result)
    assert figures == {"memory"}
    assert result["runs"][0]["estimate_gib"] == pytest.approx(10.7)
    assert "memory estimate: est" in page and "<td>optimizer</td><td>4.4</td>" in page


def test_resumed_and_half_written_logs(tmp_path):
    """A resume logs steps again (the later line wins); a run killed mid-write leaves half a line."""
    run = tmp_path / "r"
    _write_log(run, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5},
                     {"step": 3, "loss": 1.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    r = read_run(run, "r")
    assert [h["loss"] for h in r.history] == [3.0, 2.5, 1.0] and r.broken_lines == 1


def test_folders_and_names(tmp_path):
    a = _write_log(tmp_path / "x" / "sft", [{"step": 1, "loss": 1.0}])
    b = _write_log(tmp_path / "y" / "sft", [{"step": 1, "loss": 1.0}])
    assert short_names([a, b]) == ["x/sft", "y/sft"]
    assert run_folders([tmp_path / "x"]) == [a]  # a folder of runs stands for its runs
    with pytest.raises(UserError, match="holds no run"):
        run_folders([tmp_path])  # runs two levels down are not looked for
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no run"):
        run_folders([tmp_path / "empty"])
    with pytest.raises(UserError, match="not a folder"):
        run_folders([tmp_path / "nope"])
