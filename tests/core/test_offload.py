"""train.offload_activations: what autograd saves waits outside the device (numpy bytes on CPU), weights never move,
one storage saved by several layers travels once, and training gives the same numbers with a lower peak."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tinyml_cli.core.memory import PeakTensorMemory
from tinyml_cli.core.offload import OffloadActivations, offloader


class QKV(nn.Module):
    """One input read by three projections (saved three times), then an MLP."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = torch.relu(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x)
        return self.mlp(h).square().mean()


def test_gradients_equal_and_only_activations_leave_once_each(monkeypatch):
    torch.manual_seed(0)
    net = QKV()
    x = torch.randn(32, 64).tanh()  # a non-leaf input saved by q, k and v
    net(x).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    off = offloader(net, True)
    copies = []
    real = OffloadActivations._offload
    monkeypatch.setattr(OffloadActivations, "_offload",
                        lambda self, s, *a: copies.append((s.data_ptr(), s.nbytes())) or real(self, s, *a))
    with off.forward():
        loss = net(x)
    loss.backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(net.parameters(), want))
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert len(weights) == len(off.keep)
    ptrs = [c[0] for c in copies]
    assert ptrs.count(x.untyped_storage().data_ptr()) == 1  # saved by q, k and v, copied once (x stays alive here,
    # so its address is not reused; a freed activation's may be, by the next one)
    assert max(c[1] for c in copies) == 32 * 256 * 4  # activations only: no weight (64 x 256) ever left


def test_saved_activations_leave_the_device_until_the_backward_pass():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128)) for _ in range(6)])
    x = torch.randn(256, 128)
    held = {}
    for on in (False, True):
        off = offloader(net, on)
        with PeakTensorMemory(net) as mem:
            with off.forward() if off else torch.enable_grad():
                loss = net(x).square().mean()
            held[on] = mem.current  # everything the graph keeps for the backward pass, and the weights
            loss.backward()
        net.zero_grad(set_to_none=True)
    weights = sum(p.numel() * 4 for p in net.parameters())
    per_layer = 256 * (128 + 512 + 512) * 4  # inputs, GELU input, second linear's input
    assert held[False] - weights > 5 * per_layer
    assert held[True] - weights <= 2 * x.numel() * 4 + 64  # the output just made, its square, the loss


def _run(tiny_cfg, out, *sets):
    from tinyml_cli.stages.sft import run_sft
    run_sft(tiny_cfg("peft.method=full", "train.max_steps=3", "train.log_every=1", *sets), out, "sft")
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ckpt", ["false", "true"])
def test_sft_with_offloading_trains_the_same_weights(tiny_cfg, tmp_path, ckpt):
    a = _run(tiny_cfg, tmp_path / "plain", f"train.gradient_checkpointing={ckpt}")
    b = _run(tiny_cfg, tmp_path / "off", f"train.gradient_checkpointing={ckpt}", "train.offload_activations=true")
    assert a == pytest.approx(b, rel=1e-6)
    wa, wb = (load_file(tmp_path / r / "llm" / "model.safetensors") for r in ("plain", "off"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
