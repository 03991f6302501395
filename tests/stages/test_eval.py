"""eval, generate, chat and serve start from the run's own settings (its config.yaml): data.eval, encoding, gen."""

import pytest
from test_cli import one_json, tinyml

from tinyml_cli.config import load_config, save_config
from tinyml_cli.stages.eval import run_defaults


def test_run_defaults_come_from_the_runs_config(tmp_path):
    cfg = load_config(None, ["data.eval=held/out.jsonl", "data.system_prompt=Be brief.", "gen.max_new_tokens=4",
                             "train.max_steps=7", "data.columns={image: img}"])
    save_config(cfg, tmp_path, {"command": "sft"})
    d = run_defaults(tmp_path)
    assert d == {"data.eval": "held/out.jsonl", "data.max_length": 512, "data.system_prompt": "Be brief.",
                 "data.columns": {"image": "img"}, "gen.max_new_tokens": 4, "gen.temperature": 0.0, "gen.top_p": 1.0,
                 "gen.batch_size": 64}
    assert load_config(None, ["gen.max_new_tokens=9"], d).gen.max_new_tokens == 9  # --set still wins
    assert run_defaults(tmp_path / "none") == {} and run_defaults(None) == {}


@pytest.mark.slow
def test_eval_without_data_uses_the_runs_eval_data(trained, shapes, tmp_path):
    r = tinyml("eval", trained, "--json")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)["metrics"]
    assert out["n"] == 30  # shapes/eval.jsonl, the data.eval the run was trained with
    r = tinyml("eval", trained, "--data", tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "data file not found" in r.stderr
