"""train.dropout: off by default for reward / dpo / ppo (their ratios compare against eval-mode forwards), on for sft."""

import json

import pytest
import torch
from torch import nn


def _dropouts(model) -> list[float]:
    """Every dropout probability in the model: nn.Dropout modules and attention layers' float rates."""
    out = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return out + [v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]


@pytest.mark.parametrize("stage_default, setting, zero", [("off", "auto", True), ("on", "auto", False),
                                                          ("off", "on", False), ("on", "off", True)])
def test_setup_model_sets_every_dropout_to_zero_when_off(tiny_cfg, stage_default, setting, zero):
    from tinyml_cli.core.trainable import setup_model
    cfg = tiny_cfg("peft.method=lora", "peft.dropout=0.3", f"train.dropout={setting}")
    model = setup_model(cfg, dropout=stage_default)
    lora = [m.p for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, nn.Dropout)]
    assert lora and all(p == 0.3 for p in lora) != zero
    if zero:
        assert all(p == 0.0 for p in _dropouts(model))


def test_ppo_first_minibatch_has_ratio_one_and_no_clipping_under_lora_dropout(tiny, prefs, tmp_path, monkeypatch):
    """The issue's case: LoRA weights away from their zero init (std 0.1) and peft.dropout 0.5. The first minibatch
    of the first rollout is scored by the weights that sampled it: ratio 1 and clip fraction exactly 0, unless
    dropout perturbs the training forward (old code: clip fraction > 0 at step 1)."""
    from tinyml_cli.config import load_config
    from tinyml_cli.core import trainable
    from tinyml_cli.stages.ppo import run_ppo
    setup = trainable.setup_model

    def lora_moved(cfg, **kw):
        model = setup(cfg, **kw)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        return model
    monkeypatch.setattr(trainable, "setup_model", lora_moved)
    cfg = load_config(None, [f"model.llm={tiny / 'llm'}", f"model.vision={tiny / 'vision'}",
                             f"data.train={prefs / 'pref_train.jsonl'}", "peft.method=lora", "peft.dropout=0.5",
                             "train.parts=[]", "ppo.rollouts=1", "ppo.rollout_size=16", "ppo.minibatch=16",
                             "ppo.epochs=1", "ppo.max_new_tokens=4", "train.log_every=1", "train.lr=1e-3"])
    run_ppo(cfg, tmp_path / "ppo")
    first = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert first["clip_frac"] == 0.0
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5)
