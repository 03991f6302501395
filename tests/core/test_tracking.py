"""train.report_to: metrics.jsonl always, TensorBoard (and W&B offline) through accelerate's trackers."""

import json

import pytest

from tinyml_cli import UserError
from tinyml_cli.core.tracking import trackers


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_jsonl_records(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinyml_cli.stages.sft import run_sft
    run_sft(tiny_cfg("train.max_steps=3", "train.log_every=1", "train.report_to=[tensorboard]"), tmp_path, "sft")
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tinyml")).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in loss] == [r["step"] for r in log] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(events.Tags()["scalars"])


def test_unknown_or_missing_tracker_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="unknown tracker 'mlflow'"):
        trackers(["mlflow"])
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'tinyml-cli\[wandb\]'"):
        trackers(["wandb"])
    assert trackers([]) == [] and trackers(["none"]) == []
