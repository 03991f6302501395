import subprocess
import sys
from pathlib import Path

import pytest

from tinyml_cli import UserError
from tinyml_cli.config import all_keys, config_from_dict, load_config, save_config

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  llm: some/llm\ntrain:\n  max_steps: 5\n  parts: [connector, llm]\n")
    cfg = load_config(p, ["train.lr=3e-4", "train.batch_size=2", "peft.method=lora", "train.gradient_checkpointing=true"])
    assert cfg.model.llm == "some/llm"
    assert cfg.train.max_steps == 5 and cfg.train.batch_size == 2
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.parts == ["connector", "llm"]
    assert cfg.peft.method == "lora" and cfg.train.gradient_checkpointing is True


def test_override_order_defaults_then_recipe_then_set(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.5\n")
    cfg = load_config(p, [], {"train.lr": 0.1, "train.seed": 7})
    assert cfg.train.lr == 0.5 and cfg.train.seed == 7
    assert load_config(p, ["train.lr=0.25"], {"train.lr": 0.1}).train.lr == 0.25


def test_unknown_key_names_closest():
    with pytest.raises(UserError, match=r"unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(UserError, match="unknown config key 'modle.llm'"):
        load_config(None, ["modle.llm=x"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  trian: x.jsonl\n")
    with pytest.raises(UserError, match="data.train"):
        load_config(p)


def test_wrong_types_are_errors():
    with pytest.raises(UserError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(UserError, match="must be true or false"):
        load_config(None, ["train.gradient_checkpointing=maybe"])
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_choices_that_yaml_reads_as_booleans_keep_their_spelling(tmp_path):
    # YAML 1.1 reads no / off / on as booleans; a choice with that spelling is what the user meant
    assert load_config(None, ["train.mixed_precision=no", "train.dropout=off"]).train.mixed_precision == "no"
    assert load_config(None, ["train.dropout=on"]).train.dropout == "on"
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  mixed_precision: no\n  dropout: off\n")
    cfg = load_config(p)
    assert (cfg.train.mixed_precision, cfg.train.dropout) == ("no", "off")
    with pytest.raises(UserError, match="model.connector must be one of"):
        load_config(None, ["model.connector=yes"])


def test_contract_keys_exist():
    keys = all_keys()
    for k in ["model.llm", "model.vision", "model.connector", "data.train", "data.eval", "train.max_steps",
              "train.batch_size", "train.seed", "peft.method"]:
        assert k in keys and keys[k], k


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=9", "model.connector=resampler"])
    save_config(cfg, tmp_path, {"command": "sft"})
    import yaml
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["command"] == "sft"
    assert config_from_dict(data) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    assert recipe.read_text().startswith("#"), "a recipe opens with the command that runs it"
    load_config(recipe)
    load_config(recipe.stem)  # by name, as shipped in the package


ACCELERATE = sorted(Path(__file__).parent.parent.joinpath("recipes", "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_parse(path):
    """The shipped accelerate configs are valid for accelerate's own config class."""
    from accelerate.commands.config.config_args import ClusterConfig
    text = path.read_text()
    assert text.startswith("# ") and "accelerate launch --config_file" in text
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes == 2


@pytest.mark.parametrize("sets, says", [
    (["train.scheduler=cosin"], "did you mean cosine?): choose cosine, linear, constant"),
    (["peft.method=lorra"], "did you mean lora?"),
    (["train.parts=[connector,lmm]"], "did you mean llm?"),
    (["train.optimizer_in_backward=true", "train.grad_accum=4"], "needs train.grad_accum=1"),
    (["pref.beta=0"], "pref.beta must be > 0"),
    (["peft.method=ia3", "peft.parts=[llm,vision]"], "applies to the LLM only"),
])
def test_bad_choices_fail_when_the_recipe_loads_before_any_model(sets, says):
    """Typed choices and rules that tie keys together are checked by load_config itself: torch (and so any
    model) is never imported, and the error lists what is valid."""
    code = ("import sys; from tinyml_cli import UserError; from tinyml_cli.config import load_config\n"
            f"try: load_config('tiny_sft', {sets!r})\n"
            "except UserError as e: print(e); sys.exit(3 if 'torch' in sys.modules else 0)\n"
            "sys.exit(1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert says in r.stdout


def test_bad_choice_on_the_command_line_is_one_line_and_leaves_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyml_cli", "sft", "-c", "tiny_sft", "--set", "train.scheduler=cosin",
                        "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and "cosine" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_recipes_keys_lists_the_valid_values_of_every_choice():
    from tinyml_cli.config import all_keys, choices
    keys = all_keys()
    assert choices("train.scheduler") == ("cosine", "linear", "constant")
    assert keys["train.scheduler"].endswith("[cosine | linear | constant]")
    assert choices("peft.parts") == ("connector", "llm", "vision")
    typed = [k for k in keys if choices(k)]
    assert {"model.connector", "model.dtype", "data.on_error", "train.optimizer", "train.mixed_precision",
            "peft.method", "peft.quant_type", "pref.loss_type", "train.report_to"} <= set(typed)


def test_a_saved_config_with_run_facts_loads_as_a_recipe(tmp_path):
    """config.yaml beside a run (with its command, and bitdelta's base / finetuned) is a recipe `-c` runs again."""
    from tinyml_cli.config import RUN_INFO
    cfg = load_config(None, ["train.max_steps=9", "data.columns={image: img}", "peft.method=lora"])
    save_config(cfg, tmp_path, {"command": "bitdelta compress", "base": "runs/align", "finetuned": "runs/sft"})
    assert set(RUN_INFO) <= set(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text()))
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(tmp_path / "config.yaml", ["train.max_steps=2"]).train.max_steps == 2
    with pytest.raises(ValueError, match="not RUN_INFO keys"):
        save_config(cfg, tmp_path, {"comand": "sft"})  # a key load_config would refuse is never saved


def test_a_mistyped_recipe_name_gets_a_suggestion(tmp_path):
    with pytest.raises(UserError) as e:
        load_config("tiny_sfft")
    from tinyml_cli.config import shipped_recipes
    names = ", ".join(r["name"] for r in shipped_recipes())
    assert "tiny_align" in names and "tiny_sft" in names
    assert str(e.value) == f"config file not found: tiny_sfft (did you mean tiny_sft? shipped recipes: {names})"
    with pytest.raises(UserError, match="did you mean tiny_dpo"):
        load_config("tiny_dop.yaml")
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "mine.yaml")  # a path is not compared with shipped names
    assert str(e.value) == f"config file not found: {tmp_path / 'mine.yaml'}"


def test_model_sources_that_cannot_load_are_named_without_the_hub(tmp_path):
    from tinyml_cli.config import model_source_problem
    assert model_source_problem(str(tmp_path)) is None
    assert model_source_problem(str(tmp_path / "missing" / "llm")) == "no such folder"
    assert model_source_problem("./runs/llm") == "no such folder"
    (tmp_path / "f.txt").write_text("x")
    assert model_source_problem(str(tmp_path / "f.txt")) == "not a folder"
    assert "no hub model of that name in the local cache" in model_source_problem("someone/no-such-model")  # HF_HUB_OFFLINE=1 in tests


def test_estimate_with_a_missing_folder_is_one_tinyml_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyml_cli", "estimate", "--set", f"model.llm={tmp_path / 'nope'}",
                        "--set", f"model.vision={tmp_path / 'nope2'}"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: cannot load LLM config '{tmp_path / 'nope'}': no such folder"
