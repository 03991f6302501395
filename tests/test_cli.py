"""The CLI contract: --help everywhere, one JSON object with --json, exit codes 0 / 2 / 1, output folders."""

import json
import os
import subprocess
import sys

import pytest
import yaml

COMMANDS = ["pretrain-align", "sft", "eval", "generate", "demo", "build-tiny", "data synth-shapes", "merge", "estimate",
            "export", "quantize", "bitdelta compress", "bitdelta apply", "reward", "reward score", "dpo", "ppo",
            "data synth-preferences", "report"]


def tinyml(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tinyml_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def one_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


def test_root_help_lists_commands():
    r = tinyml("--help")
    assert r.returncode == 0
    for c in ["pretrain-align", "sft", "eval", "generate", "demo", "build-tiny", "data"]:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    r = tinyml(*command.split(), "--help")
    assert r.returncode == 0, r.stderr
    assert "Example: tinyml" in r.stdout


def test_help_does_not_import_torch():
    code = "import sys, tinyml_cli.cli; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bad_flag_is_exit_2():
    r = tinyml("sft", "--no-such-flag")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_unknown_key_is_one_line_exit_2(tmp_path):
    r = tinyml("sft", "--set", "train.max_step=3", "-o", tmp_path / "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "train.max_steps" in lines[0]


def test_missing_data_is_exit_2(tiny, tmp_path):
    r = tinyml("sft", "--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
               "--set", "data.train=/nonexistent.jsonl", "-o", tmp_path / "x")
    assert r.returncode == 2 and "data file not found: /nonexistent.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file_is_exit_2(tmp_path):
    r = tinyml("sft", "-c", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_eval_of_a_non_model_folder_is_exit_2(tmp_path):
    r = tinyml("eval", tmp_path, "--data", tmp_path / "e.jsonl")
    assert r.returncode == 2 and "not a tinyml model folder" in r.stderr


def test_data_synth_shapes(tmp_path):
    r = tinyml("data", "synth-shapes", tmp_path / "d", "--n", 5, "--n-eval", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)
    assert out["command"] == "data synth-shapes" and out["metrics"]["images"] == 7
    assert len((tmp_path / "d" / "eval.jsonl").read_text().splitlines()) == 2 * 5


@pytest.mark.slow
def test_build_tiny(tmp_path):
    r = tinyml("build-tiny", tmp_path / "t", "--llm-steps", 2, "--vision-steps", 2, "--scenes", 100, "--json")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)
    assert out["metrics"]["llm_params"] > 0 and out["metrics"]["vision_params"] > 0
    for f in ["llm/config.json", "llm/model.safetensors", "llm/tokenizer.json", "llm/chat_template.jinja",
              "vision/config.json", "vision/model.safetensors", "vision/preprocessor_config.json"]:
        assert (tmp_path / "t" / f).is_file(), f


@pytest.mark.slow
def test_pipeline_commands_end_to_end(tiny, shapes, tmp_path):
    parts = ["--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
             "--set", f"data.train={shapes / 'captions.jsonl'}", "--set", "train.max_steps=2",
             "--set", "train.batch_size=4"]
    r = tinyml("pretrain-align", "-c", "tiny_align", *parts, "-o", tmp_path / "align", "--json")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)
    assert out["command"] == "pretrain-align" and out["output_dir"] == str(tmp_path / "align")
    assert 0 < out["trainable_params"] < out["total_params"]
    assert {"loss_first", "loss_last", "tokens_per_s", "steps"} <= set(out["metrics"])
    for f in ["config.yaml", "metrics.jsonl", "tinyml_model.json", "connector.safetensors"]:
        assert (tmp_path / "align" / f).is_file(), f

    # an existing run is not overwritten by accident
    r = tinyml("pretrain-align", "-c", "tiny_align", *parts, "-o", tmp_path / "align")
    assert r.returncode == 2 and "--resume" in r.stderr

    r = tinyml("sft", "-c", "tiny_sft", "--set", f"model.init_from={tmp_path / 'align'}",
               "--set", f"data.train={shapes / 'train.jsonl'}", "--set", "train.max_steps=2",
               "--set", "train.batch_size=4", "--set", "peft.method=lora", "-o", tmp_path / "sft", "--json")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)
    assert out["command"] == "sft" and out["trainable_params"] < out["total_params"]
    assert (tmp_path / "sft" / "llm_adapter" / "adapter_model.safetensors").is_file()

    r = tinyml("eval", tmp_path / "sft", "--data", shapes / "eval.jsonl", "-o", tmp_path / "ev", "--json")
    assert r.returncode == 0, r.stderr
    m = one_json(r.stdout)["metrics"]
    assert 0 <= m["vqa_accuracy"] <= 1 and m["n"] == 30
    assert set(m["vqa_accuracy_by_type"]) == {"color", "shape", "count", "existence", "position"}
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(m["pope"])
    assert (tmp_path / "ev" / "predictions.jsonl").is_file()

    r = tinyml("generate", tmp_path / "sft", "--image", shapes / "images" / "000000.png",
               "--prompt", "What color is the circle?", "--json")
    assert r.returncode == 0, r.stderr
    assert isinstance(one_json(r.stdout)["answer"], str)


@pytest.mark.slow
def test_demo_quick_reports_the_contract_metrics(tmp_path):
    r = tinyml("demo", "--quick", "--json", "--seed", "2", "-o", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    out = one_json(r.stdout)
    m = out["metrics"]
    assert m["seed"] == 2  # --seed drives the data and every training run
    for run in ("align", "sft"):
        assert yaml.safe_load((tmp_path / "demo" / run / "config.yaml").read_text())["train"]["seed"] == 2
    from tinyml_cli.demo.synth import synth_shapes
    synth_shapes(tmp_path / "seed2", n=48, n_eval=4, seed=2)
    assert (tmp_path / "seed2" / "train.jsonl").read_text() == (tmp_path / "demo" / "shapes" / "train.jsonl").read_text()
    for k in ["vqa_accuracy_before", "vqa_accuracy_after", "vqa_accuracy_by_type", "pope_f1_after", "seconds"]:
        assert k in m, k
    assert set(m["vqa_accuracy_by_type"]) == {"color", "shape", "count", "existence", "position"}
    for sub in ["tiny/llm", "shapes/train.jsonl", "align/connector.safetensors", "sft/config.yaml"]:
        assert (tmp_path / "demo" / sub).exists(), sub


def test_reader_that_stops_early_is_not_a_failure():
    """`tinyml --help | grep -q sft` under `set -o pipefail`: a closed stdout ends the command with exit 0."""
    p = subprocess.Popen([sys.executable, "-m", "tinyml_cli", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    assert p.wait(timeout=60) == 0
    assert b"Traceback" not in p.stderr.read()
