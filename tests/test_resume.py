"""Fault injection: a training process killed with SIGKILL at a random moment resumes to identical weights."""

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
