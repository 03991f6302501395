"""Two CPU processes (DDP over gloo, launched by torchrun) follow one process's loss curve for the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="torchrun not installed")
def test_two_processes_match_one(tiny, shapes, tmp_path):
    sets = ["--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
            "--set", f"data.train={shapes / 'train.jsonl'}", "--set", "train.max_steps=6", "--set", "train.log_every=1",
            "--set", "train.lr=1e-3", "--set", "train.parts=connector,llm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tinyml_cli", "sft", *sets, "--set", "train.batch_size=4",
                          "-o", tmp_path / "one"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
                          "-m", "tinyml_cli", "sft", *sets, "--set", "train.batch_size=2", "-o", tmp_path / "two"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    curve = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 6
    # Same examples per global batch, and each process's loss weighted by its share of the tokens: the curves
    # agree to float precision. Two processes that each trained alone on half the batch differ by several per cent.
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-3 * x, (a, b)
    assert b[-1] < b[0]
    assert (tmp_path / "two" / "connector.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"), reason="torchrun not installed")
def test_two_process_dpo_matches_one_and_writes_once(tiny, prefs, tmp_path):
    """dpo under DDP: the policy's log-probs go through the wrapped model's forward (so gradients are
    synchronised), each process precomputes its reference log-probs, rank 0 alone writes the run folder."""
    sets = ["--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
            "--set", f"data.train={prefs / 'pref_train.jsonl'}", "--set", f"data.eval={prefs / 'pref_eval.jsonl'}",
            "--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "train.lr=1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tinyml_cli", "dpo", *sets, "--set", "train.batch_size=4",
                          "-o", tmp_path / "one", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
                          "-m", "tinyml_cli", "dpo", *sets, "--set", "train.batch_size=2", "-o", tmp_path / "two",
                          "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # one result, from rank 0
    curve = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-3 * x, (a, b)
    assert (tmp_path / "two" / "tinyml_model.json").is_file() and (tmp_path / "two" / "config.yaml").is_file()
