"""Fault injection: a training process killed with SIGKILL at a random moment resumes to identical weights."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def _sft(tiny, shapes, out, *extra, resume=False):
    args = [sys.executable, "-m", "tinyml_cli", "sft", "--set", f"model.llm={tiny / 'llm'}",
            "--set", f"model.vision={tiny / 'vision'}", "--set", f"data.train={shapes / 'train.jsonl'}",
            "--set", "train.max_steps=12", "--set", "train.save_every=1", "--set", "train.keep_last=3",
            "--set", "train.batch_size=4", "--set", "train.lr=2e-3", "--set", "train.parts=connector,llm",
            *extra, "-o", str(out)] + (["--resume"] if resume else [])
    return args


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora"])
def test_sigkill_then_resume_matches_uninterrupted(tiny, shapes, tmp_path, method):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    extra = ["--set", f"peft.method={method}"]
    full = subprocess.run(_sft(tiny, shapes, tmp_path / "full", *extra), capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr

    kill_after = random.Random().randint(2, 9)  # a random step, with checkpoint writes in flight around it
    proc = subprocess.Popen(_sft(tiny, shapes, tmp_path / "killed", *extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / f"step-{kill_after:08d}").exists():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = subprocess.run(_sft(tiny, shapes, tmp_path / "killed", *extra, resume=True), capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    files = ["connector.safetensors"] + (["llm_adapter/adapter_model.safetensors"] if method in ("lora", "qlora")
                                         else ["llm/model.safetensors"])
    if method == "full":
        files.append("vision/model.safetensors")
    for f in files:
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "killed" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (f, k, kill_after)


@pytest.mark.slow
def test_ppo_killed_mid_rollout_resumes_to_the_same_weights(tiny, prefs, tmp_path):
    """PPO on the shared loop: a checkpoint holds the rollout in progress (its responses, advantages and the
    order of its minibatches), the prompt sampler and the KL controller, so a run killed between two
    minibatches of a rollout ends on the weights of the run that was never stopped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    parts = ["--set", f"model.llm={tiny / 'llm'}", "--set", f"model.vision={tiny / 'vision'}",
             "--set", f"data.train={prefs / 'pref_train.jsonl'}"]
    # The untrained tiny model never answers exactly, so exact_match would give every response 0 and PPO no
    # gradient: a (briefly trained) reward model scores every response differently.
    rm = subprocess.run([sys.executable, "-m", "tinyml_cli", "reward", *parts, "--set", "train.max_steps=1",
                         "-o", str(tmp_path / "rm")], capture_output=True, text=True, env=env)
    assert rm.returncode == 0, rm.stderr[-3000:]

    def ppo(out, resume=False):
        return [sys.executable, "-m", "tinyml_cli", "ppo", *parts, "--set", f"ppo.reward={tmp_path / 'rm'}",
                "--set", "ppo.rollouts=3", "--set", "ppo.rollout_size=6", "--set", "ppo.minibatch=3",
                "--set", "ppo.epochs=2", "--set", "ppo.adaptive_kl=true", "--set", "peft.method=lora",
                "--set", "train.save_every=1", "--set", "train.keep_last=20", "--set", "train.lr=1e-3",
                "--set", "train.log_every=1", "-o", str(out)] + (["--resume"] if resume else [])
    full = subprocess.run(ppo(tmp_path / "full"), capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    kill_after = 6  # rollout 2 of 3 (4 minibatches each): two of its minibatches done, two to go
    proc = subprocess.Popen(ppo(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (ckpts / f"step-{kill_after:08d}").exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(ppo(tmp_path / "killed", resume=True) + ["--json"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["metrics"]["resumed_from"] % 4, "killed at a rollout's end, not inside it"
    for f in ["llm_adapter/adapter_model.safetensors", "value_head.safetensors", "connector.safetensors"]:
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "killed" / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (f, k)
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    done = {r["step"]: r for r in rows(tmp_path / "killed")}  # the resumed part appends; steps after a kill repeat
    for r in rows(tmp_path / "full"):
        assert done[r["step"]]["score"] == r["score"] and done[r["step"]]["loss"] == pytest.approx(r["loss"], abs=1e-6)
    assert min(abs(r["loss"]) for r in rows(tmp_path / "full")) > 0  # every step learned something
    b = load_file(tmp_path / "full" / "llm_adapter/adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 0
