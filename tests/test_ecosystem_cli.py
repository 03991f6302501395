"""CLI comfort: shipped recipes listed and shown, shell completion, report from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinyml_cli.config import load_config


def tinyml(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinyml_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("command", ["report", "recipes list", "recipes show", "recipes keys"])
def test_help_has_an_example(command):
    r = tinyml(*command.split(), "--help")
    assert r.returncode == 0, r.stderr
    assert "Example: tinyml" in r.stdout


def test_recipes_list_and_show():
    r = tinyml("recipes", "list", "--json")
    assert r.returncode == 0, r.stderr
    found = {x["name"]: x for x in json.loads(r.stdout)["recipes"]}
    assert {"tiny_align", "tiny_sft"} <= set(found)
    assert found["tiny_sft"]["command"].startswith("tinyml sft -c tiny_sft -o runs/sft")  # by name: a pip user has no recipes/
    for name in found:  # every shipped recipe shows, parses and loads as a valid config
        text = tinyml("recipes", "show", name).stdout
        assert isinstance(yaml.safe_load(text), dict)
        load_config(name)
    r = tinyml("recipes", "show", "no_such_recipe")
    assert r.returncode == 2 and "shipped: " in r.stderr and "Traceback" not in r.stderr


def test_recipes_keys_lists_every_key():
    r = tinyml("recipes", "keys", "--json")
    keys = json.loads(r.stdout)["keys"]
    assert keys["train.lr"]["default"] == 1e-3 and "learning rate" in keys["train.lr"]["help"]


def test_shell_completion(tmp_path):
    script = Path(sys.executable).parent / "tinyml"
    assert "--install-completion" in tinyml("--help").stdout
    r = subprocess.run([str(script), "--show-completion", "bash"], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0 and "_TINYML_COMPLETE=complete_bash" in r.stdout
    # what bash asks when the user presses TAB after `tinyml rep`
    r = subprocess.run([str(script)], capture_output=True, text=True,
                       env={**os.environ, "_TINYML_COMPLETE": "complete_bash", "COMP_WORDS": "tinyml rep",
                            "COMP_CWORD": "1"})
    assert r.stdout.split() == ["report"]
    r = subprocess.run([str(script), "--install-completion", "bash"], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0 and "tinyml" in (tmp_path / ".bashrc").read_text()


def test_report_command(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3}) + "\n"
                                               for s in range(1, 6)))
    r = tinyml("report", run, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["command"] == "report" and out["runs"][0]["steps"] == 5
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "training.png").stat().st_size > 2000
    r = tinyml("report", tmp_path / "nope")
    assert r.returncode == 2 and "not a folder" in r.stderr
