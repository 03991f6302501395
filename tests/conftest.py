"""Shared fixtures: the tiny default (briefly pretrained) and a small shapes data set, built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny default built by the real builder with a few pretraining steps; returns its folder."""
    from tinyml_cli.demo.tiny import build_tiny
    out = tmp_path_factory.mktemp("tiny")
    build_tiny(out, llm_steps=3, vision_steps=3, n_scenes=300)
    return out


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    from tinyml_cli.demo.synth import synth_shapes
    out = tmp_path_factory.mktemp("shapes")
    synth_shapes(out, n=48, n_eval=6, seed=0)
    return out


@pytest.fixture(scope="session")
def prefs(tmp_path_factory):
    """A small preference data set (hallucination pairs) with its held-out pairs and POPE probe."""
    from tinyml_cli.demo.synth import synth_preferences
    out = tmp_path_factory.mktemp("prefs")
    synth_preferences(out, n=24, n_eval=8, n_probe=6, seed=3)
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tiny, shapes):
    """A RunConfig over the tiny default and the small shapes data (a fresh copy per call)."""
    from tinyml_cli.config import load_config

    def make(*sets):
        return load_config(None, [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}",
                                  f"data.train={shapes / 'train.jsonl'}", f"data.eval={shapes / 'eval.jsonl'}",
                                  "train.batch_size=4", "train.max_steps=3", "gen.max_new_tokens=3", *sets])
    return make


@pytest.fixture(scope="session")
def sft_crashing_at():
    """run(cfg, out_dir, step): an sft run into out_dir that dies (an exception from its progress callback) at `step`."""
    from tinyml_cli.stages.sft import run_sft

    class Crash(Exception):
        pass

    def run(cfg, out_dir, step):
        def progress(s, total, loss, tps):
            if s == step:
                raise Crash()
        with pytest.raises(Crash):
            run_sft(cfg, out_dir, "sft", progress=progress)
    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    import torch

    from tinyml_cli.core.model import build_model
    torch.manual_seed(0)
    return build_model(tiny_cfg().model)
