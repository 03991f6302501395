"""A run's own config.yaml runs again as it is (`-c RUN/config.yaml --overwrite`), for every training command; and
each training stage says what it is doing before its first step."""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from tinyml_cli.config import load_config


def run_cli(*args) -> dict:
    """`tinyml ARGS --json` in this process (no interpreter start per run): its JSON object; fails on exit != 0."""
    from tinyml_cli.cli import main
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["tinyml", *map(str, args), "--json"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    assert e.value.code == 0, err.getvalue()[-2000:]
    return json.loads(out.getvalue())


def rerun_from_saved(command: list, run, metric: str, *positional) -> None:
    """The run's config.yaml fed back with -c into the same folder (--overwrite): same recipe, same first loss."""
    saved = run / "config.yaml"
    first_cfg = load_config(saved)
    first = json.loads(json.dumps(yaml.safe_load(saved.read_text())))
    before = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    again = run_cli(*command, *positional, "-c", saved, "--overwrite", *([] if positional else ["-o", run]))
    assert again["output_dir"] == str(run)
    assert yaml.safe_load(saved.read_text()) == first  # the re-run saved the very same recipe (and run facts)
    assert load_config(saved) == first_cfg
    after = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert after[metric] == pytest.approx(before[metric], rel=1e-4)  # and it is the same run


@pytest.mark.slow
def test_every_training_commands_saved_config_runs_again(tiny, shapes, prefs, tmp_path):
    short = ["--set", "train.max_steps=2", "--set", "train.batch_size=2"]
    align, sft = tmp_path / "align", tmp_path / "sft"
    run_cli("pretrain-align", "-c", "tiny_align", "--set", f"model.llm={tiny / 'llm'}", "--set",
            f"model.vision={tiny / 'vision'}", "--set", f"data.train={shapes / 'captions.jsonl'}", *short, "-o", align)
    rerun_from_saved(["pretrain-align"], align, "loss")

    run_cli("sft", "-c", "tiny_sft", "--set", f"model.init_from={align}", "--set", f"data.train={shapes / 'train.jsonl'}",
            "--set", f"data.eval={shapes / 'eval.jsonl'}", *short, "-o", sft)
    rerun_from_saved(["sft"], sft, "loss")

    pref = ["--set", f"model.init_from={sft}", "--set", f"data.train={prefs / 'pref_train.jsonl'}",
            "--set", f"data.eval={prefs / 'pref_eval.jsonl'}"]
    for command in ("reward", "dpo"):
        run_cli(command, "-c", f"tiny_{command}", *pref, *short, "-o", tmp_path / command)
        rerun_from_saved([command], tmp_path / command, "loss")

    run_cli("ppo", "-c", "tiny_ppo", *pref, "--set", "ppo.rollouts=1", "--set", "ppo.rollout_size=4",
            "--set", "ppo.minibatch=4", "--set", "ppo.epochs=1", "--set", "ppo.max_new_tokens=2", "-o", tmp_path / "ppo")
    rerun_from_saved(["ppo"], tmp_path / "ppo", "loss")

    delta = tmp_path / "delta"
    run_cli("bitdelta", "compress", align, sft, delta, *short)
    saved = yaml.safe_load((delta / "config.yaml").read_text())
    assert saved["command"] == "bitdelta compress" and saved["base"] == str(align)
    rerun_from_saved(["bitdelta", "compress"], delta, "loss", align, sft, delta)


@pytest.mark.slow
def test_training_stages_say_what_they_do_before_the_first_step(tiny_cfg, prefs, tmp_path):
    """The status line: loading (which model), encoding (which file), then the count of records, all before step 1."""
    from tinyml_cli.stages.dpo import run_dpo
    from tinyml_cli.stages.sft import run_sft
    said, steps = [], []

    def progress(step, total, loss, tps):
        steps.append(step)
        said.append(f"step {step}")
    # a cache folder of its own: other tests of the session may have encoded the same data already
    cfg = tiny_cfg("train.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}")
    run_sft(cfg, tmp_path / "sft", "sft", progress=progress, status=said.append)
    assert said[0] == f"loading the model ({cfg.model.llm} + {cfg.model.vision})"
    assert said[1] == f"reading and encoding {cfg.data.train}"
    n = sum(1 for line in Path(cfg.data.train).read_text().splitlines() if line.strip())
    assert said[-3].startswith(f"{n:,} records encoded (") and said[-2:] == ["first step (decoding its images)", "step 1"]
    said.clear()
    run_sft(cfg, tmp_path / "sft", "sft", progress=progress, status=said.append)  # the same data again: the cache
    assert said[-3].startswith(f"{n:,} records from the cache (") and len(said) == 5
    said.clear()
    dcfg = load_config("tiny_dpo", [f"model.init_from={tmp_path / 'sft'}", f"data.train={prefs / 'pref_train.jsonl'}",
                                    f"data.eval={prefs / 'pref_eval.jsonl'}", "train.max_steps=1", "train.batch_size=4"])
    run_dpo(dcfg, tmp_path / "dpo", progress=progress, status=said.append)
    assert said == [f"loading the model ({tmp_path / 'sft'})", f"reading and encoding {prefs / 'pref_train.jsonl'}",
                    "reference log-probs of 8 held-out pairs", "reference log-probs of 24 training pairs",
                    "24 pairs; first step", "step 1"]
