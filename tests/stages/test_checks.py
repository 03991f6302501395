"""What a command checks before it loads a model, and what its output folder may be and becomes on failure."""

import json
import os
import subprocess
import sys

import pytest

from tinyml_cli import UserError
from tinyml_cli.config import load_config
from tinyml_cli.stages.checks import check_run, run_inputs
from tinyml_cli.stages.outputs import prepare_output, removed_if_left_empty


@pytest.fixture
def folders(tmp_path):
    """A fake model folder, a fake reward model folder and a data file: what the checks look at."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tinyml_model.json").write_text("{}")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward_head.safetensors").write_bytes(b"")
    (tmp_path / "train.jsonl").write_text("{}\n")
    return tmp_path


def cfg(folders, *sets):
    return load_config(None, [f"model.init_from={folders / 'model'}", f"data.train={folders / 'train.jsonl'}", *sets])


@pytest.mark.parametrize("sets, command, says", [
    (["data.train="], "sft", "data.train is not set (a LLaVA-format JSON / JSONL file)"),
    (["data.train="], "dpo", "data.train is not set (a preference JSONL"),
    (["data.train=nope.jsonl"], "sft", "data.train: data file not found: nope.jsonl"),
    (["data.train=runs/missing"], "sft", "HF_HUB_OFFLINE is set"),  # hub-id-like and offline
    (["data.eval=nope.jsonl"], "dpo", "data.eval: data file not found: nope.jsonl"),
    (["data.eval=nope.jsonl"], "bitdelta compress", "data.eval: data file not found"),
    (["model.init_from=/no/such/run"], "sft", "model.init_from: not a tinyml model folder"),
    (["model.init_from=", "model.llm=/no/such/llm", "model.vision=x/y"], "sft", "model.llm=/no/such/llm: no such folder"),
    (["model.init_from=", "model.llm=", "model.vision=x/y"], "pretrain-align", "model.llm is not set"),
    (["model.init_from=", "model.llm=owner/llm", "model.vision=owner/vision"], "sft",
     "model.llm=owner/llm: no such folder, and no hub model of that name in the local cache"),
    (["ppo.reward=runs/nope"], "ppo", "ppo.reward=runs/nope: neither exact_match nor a reward model folder"),
])
def test_each_missing_input_is_named_before_any_model(folders, sets, command, says):
    with pytest.raises(UserError) as e:
        check_run(cfg(folders, *sets), command)
    assert says in str(e.value)


def test_good_inputs_pass_and_what_a_command_does_not_read_is_not_checked(folders):
    check_run(cfg(folders), "sft")
    check_run(cfg(folders, "data.eval=nope.jsonl"), "sft")  # sft does not read data.eval
    check_run(cfg(folders, f"ppo.reward={folders / 'rm'}"), "ppo")
    check_run(cfg(folders, "model.init_from=/no/such/run"), "bitdelta compress")  # BASE / FINETUNED are its models


def test_the_checks_import_no_torch(folders):
    """The CLI's path up to the checks: a mistyped data path is reported without torch or transformers loaded."""
    code = (f"import sys\nsys.argv = ['tinyml', 'sft', '--set', 'model.init_from={folders / 'model'}', '--set', "
            f"'data.train={folders / 'missing.jsonl'}', '-o', '{folders / 'run'}']\n"
            "from tinyml_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "sys.exit(10 + code if 'torch' in sys.modules or 'transformers' in sys.modules else code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: data.train: data file not found: {folders / 'missing.jsonl'}"
    assert not (folders / "run").exists()


def test_an_output_folder_may_not_hold_an_input(folders):
    c = cfg(folders, f"data.eval={folders / 'train.jsonl'}")
    assert run_inputs(c) == [str(folders / "model"), str(folders / "train.jsonl"), str(folders / "train.jsonl")]
    for out in (folders / "model", folders):
        with pytest.raises(UserError, match="holds the input"):
            prepare_output(out, overwrite=True, inputs=run_inputs(c))
    assert (folders / "model" / "tinyml_model.json").is_file()  # nothing was deleted
    assert prepare_output(folders / "elsewhere", inputs=run_inputs(c)) == folders / "elsewhere"


def test_occupied_folders_need_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="already holds files: pass --overwrite"):
        prepare_output(tmp_path / "out", marker="", holds="files")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"
    prepare_output(tmp_path / "out", overwrite=True, marker="", holds="files")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty", marker="", holds="files")  # an empty folder is free
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_output(tmp_path / "file")


class Boom(Exception):
    pass


@pytest.mark.parametrize("made, files, kept", [
    (True, [], False),                        # made by the command, nothing written: removed
    (True, ["config.yaml"], False),           # a run that failed before its first step: removed
    (True, ["config.yaml", "metrics.jsonl:"], False),  # ... with the metrics file opened but nothing logged
    (True, ["config.yaml", "metrics.jsonl"], True),  # it trained: its metrics stay (and --resume needs the folder)
    (True, ["checkpoints/step-00000002/meta.json"], True),
    (False, [], True),                        # a folder that was there before is never removed
])
def test_a_failed_command_leaves_no_empty_folder(tmp_path, made, files, kept):
    out = tmp_path / "run"
    if not made:
        out.mkdir()
    with pytest.raises(Boom), removed_if_left_empty(out):
        out.mkdir(exist_ok=True)
        (out / "checkpoints").mkdir()
        for f in files:  # NAME: an empty file
            name = f.rstrip(":")
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("" if f.endswith(":") else json.dumps({}))
        raise Boom()
    assert out.exists() == kept


def test_success_keeps_the_folder(tmp_path):
    with removed_if_left_empty(tmp_path / "run") as out:
        out.mkdir()
    assert (tmp_path / "run").is_dir()
