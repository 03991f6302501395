from pathlib import Path

import pytest

from tinyml_cli import UserError
from tinyml_cli.config import all_keys, load_config, save_config, config_from_dict

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
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    text = path.read_text()
    assert text.startswith("# ") and "accelerate launch --config_file" in text
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes == 2
