"""Shared fixtures: the tiny default (briefly pretrained) and a small shapes data set, built once per session."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# encoded data sets (records.encoded) go to a fresh cache folder per session, not the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tinyml-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
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


@pytest.fixture(scope="session")
def trained(tiny_cfg, tmp_path_factory):
    """A few full-sft steps on the tiny default, with the EOS row of lm_head pushed down.

    After 3 steps the model answers EOS at once, which would make greedy parity a one-token check; a model that
    never stops makes every prompt a multi-token sequence, through the KV cache.
    """
    from tinyml_cli.core.model import load_model
    from tinyml_cli.stages.sft import run_sft
    run = tmp_path_factory.mktemp("run")
    run_sft(tiny_cfg("peft.method=full"), run, "sft")
    model = load_model(run)
    head = model.llm.get_output_embeddings().weight.data
    head[model.tokenizer.eos_token_id] = -10 * head.mean(0)
    model.save(run)
    return run


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The trained model's fp32 ONNX export (`tinyml export`: its config.yaml travels with it)."""
    from tinyml_cli.stages.export import run_export
    out = tmp_path_factory.mktemp("onnx")
    run_export(trained, out)
    return out
