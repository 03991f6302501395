"""train.optimizer_in_backward: the same run as the ordinary optimizer path (clipping off), resumable, refused where
it cannot be right."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tinyml_cli import UserError
from tinyml_cli.stages.sft import run_sft

FULL = ("peft.method=full", "train.lr=3e-3", "train.max_steps=4", "train.max_grad_norm=0", "train.log_every=1",
        "train.weight_decay=0.01", "train.scheduler=linear", "train.warmup_ratio=0.25")


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_weights_and_losses_match_the_ordinary_optimizer(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*FULL)
    run_sft(cfg, tmp_path / "plain", "sft")
    run_sft(tiny_cfg(*FULL, "train.optimizer_in_backward=true"), tmp_path / "inbw", "sft")
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "inbw"), rel=1e-5, abs=1e-6)
    start = load_file(f"{cfg.model.llm}/model.safetensors")
    a, b = (load_file(tmp_path / run / "llm" / "model.safetensors") for run in ("plain", "inbw"))
    assert all(not torch.equal(a[k], start[k]) for k in a), "every LLM weight trains"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    for f in ["connector.safetensors", "vision/model.safetensors"]:
        a, b = load_file(tmp_path / "plain" / f), load_file(tmp_path / "inbw" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a), f


def test_resume_from_a_checkpoint_gives_identical_weights(tiny_cfg, sft_crashing_at, tmp_path):
    cfg = tiny_cfg(*FULL, "train.optimizer_in_backward=true", "train.save_every=2")
    run_sft(cfg, tmp_path / "full", "sft")
    sft_crashing_at(cfg, tmp_path / "resumed", 3)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["optimizer"]["state"], "the AdamW moments are in the checkpoint"
    r = run_sft(cfg, tmp_path / "resumed", "sft", resume=True)
    assert r["metrics"]["resumed_from"] == 2
    for f in ["connector.safetensors", "llm/model.safetensors"]:
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "resumed" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), f


@pytest.mark.parametrize("bad, needs", [("train.grad_accum=2", "train.grad_accum=1"),
                                        ("train.max_grad_norm=1.0", "train.max_grad_norm=0")])
def test_incompatible_settings_are_config_errors(tiny_cfg, tmp_path, bad, needs):
    with pytest.raises(UserError, match=needs):  # when the recipe loads, before any model
        tiny_cfg(*FULL, "train.optimizer_in_backward=true", bad)


def _mlp_step(in_backward: bool):
    """Peak tensor bytes of two AdamW steps of a weight-heavy MLP, and the bytes of its gradients."""
    from tinyml_cli.core.loop import step_in_backward
    from tinyml_cli.core.memory import PeakTensorMemory
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    hooks = step_in_backward(params, opt) if in_backward else []
    with PeakTensorMemory(net) as mem:
        for _ in range(2):
            net(torch.randn(2, 256)).square().mean().backward()
            if not in_backward:
                opt.step()
            opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    return mem.peak, sum(p.numel() * 4 for p in params), net


def test_each_weight_steps_alone_and_no_full_set_of_gradients_is_held():
    from tinyml_cli.core.loop import step_in_backward
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    held, step = [], opt.step

    def counting_step():
        held.append(sum(p.grad is not None for p in params))
        step()
    opt.step = counting_step
    before = [p.detach().clone() for p in params]
    step_in_backward(params, opt)
    net(torch.randn(4, 8)).sum().backward()
    assert held == [1] * len(params)  # one step per weight, with only its own gradient alive
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))

    plain, grads, a = _mlp_step(False)
    in_bw, _, b = _mlp_step(True)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.parameters(), b.parameters()))
    # weights + AdamW moments + at most one weight's gradient, vs weights + moments + every gradient
    assert in_bw <= plain - 0.6 * grads


# ------------------------------------------------------------------ every method and objective, 8-bit states
def _weights(run):
    out = {}
    for f in sorted(run.rglob("*.safetensors")):
        if "checkpoints" not in f.parts:
            out.update({f"{f.relative_to(run)}:{k}": v for k, v in load_file(f).items()})
    return out


def _same_run(tiny_cfg, tmp_path, runner, *sets):
    """`runner(cfg, out)` once with the ordinary step and once with the step in the backward pass: equal losses and
    saved weights, and the weights moved."""
    common = ("train.max_grad_norm=0", "train.log_every=1", "train.lr=3e-3", *sets)
    runner(tiny_cfg(*common), tmp_path / "plain")
    runner(tiny_cfg(*common, "train.optimizer_in_backward=true"), tmp_path / "inbw")
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "inbw"), rel=1e-5, abs=1e-6)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "inbw")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    return a


@pytest.mark.parametrize("sets", [("peft.method=lora", "train.parts=[connector]"),
                                  ("peft.method=full", "train.optimizer=adamw8bit"),
                                  ("peft.method=lora", "train.optimizer=paged_adamw8bit")],
                         ids=["lora", "full-adamw8bit", "lora-paged8bit"])
def test_sft_methods_and_8bit_states_match_the_ordinary_step(tiny_cfg, tmp_path, sets):
    _same_run(tiny_cfg, tmp_path, lambda cfg, out: run_sft(cfg, out, "sft"), *sets)


def _pref_cfg(tiny_cfg, prefs):
    return lambda *sets: tiny_cfg(f"data.train={prefs / 'pref_train.jsonl'}", "data.eval=", *sets)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "reward", "ppo"])
def test_preference_objectives_match_the_ordinary_step(tiny_cfg, prefs, tmp_path, stage):
    from tinyml_cli.stages.dpo import run_dpo
    from tinyml_cli.stages.ppo import run_ppo
    from tinyml_cli.stages.reward import run_reward
    runner = {"dpo": run_dpo, "reward": run_reward, "ppo": run_ppo}[stage]
    extra = ("ppo.rollouts=2", "ppo.rollout_size=4", "ppo.minibatch=2", "ppo.epochs=1") if stage == "ppo" else ()
    _same_run(_pref_cfg(tiny_cfg, prefs), tmp_path, lambda cfg, out: runner(cfg, out), "peft.method=lora", *extra)
