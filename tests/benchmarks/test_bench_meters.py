"""The benchmarks' meters (benchmarks/common.py; peak memory is the package's) against hand-computed values."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402


def test_the_package_meter_the_benchmarks_use_tracks_peak_and_frees():
    with common.PeakTensorMemory(inputs=True) as mode:
        a = torch.ones(1000)              # 4000 bytes
        b = a * 2                         # +4000: peak 8000
        del a, b                          # both storages freed
        c = torch.zeros(250)              # 1000 bytes, well under the peak
        v = c[10:]                        # a view shares c's storage: no new bytes
        v.add_(1)
    assert mode.peak == 8000
    assert mode.current == 1000


def test_token_counter_sums_attention_mask_of_training_forward_calls():
    class M(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids

    m = M()
    counter = common.TokenCounter(m)
    m(input_ids=torch.zeros(2, 4), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    m(torch.zeros(1, 3), torch.ones(1, 3))
    with torch.no_grad():  # a reference pass (TRL's DPO runs it through the same peft model) trains nothing
        m(torch.zeros(1, 3), torch.ones(1, 3))
    assert counter.total == 5 + 3


def test_peak_rss_is_this_process_alone():
    import subprocess
    big = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB resident in this (parent) process
    code = f"import sys; sys.path.insert(0, {str(Path(common.__file__).parent)!r}); import common; print(common.peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert common.peak_rss_bytes() > big.numel()
    assert child < common.peak_rss_bytes()  # not the parent's size carried over fork and exec
