"""Data at LLaVA-665k size: seconds to the first training step (cold and warm encoded-data cache), peak RSS, and
the share of step time spent waiting for data with and without DataLoader workers.

    python benchmarks/data_scale.py                      # a table
    python benchmarks/data_scale.py --json               # {"sizes": [{records, seconds_to_first_step_cold, ...}]}
    python benchmarks/data_scale.py --sizes 8000 --json  # one size
    python benchmarks/data_scale.py --packing --sizes 8000 --json  # tokens/s with data.packing off / on

The data: JSONL files of 8k, 80k and 665k records that repeat shapes conversations (3-5 question turns each)
over 300 shapes images drawn at 384 px, as LLaVA-v1.5-665k mixes repeat its images. The model: the benchmarks'
random-weight LLaVA (32k BPE, ~32M Llama, SigLIP at 32 px: the processor resizes each 384 px image), trained
with tinyml's defaults (connector only).

Per size, each figure from a fresh `tinyml sft` process:
- seconds_to_first_step_cold: wall time of `sft train.max_steps=1` with an empty cache (encoding with
  data.num_proc processes included; so are interpreter start, imports, model load and the model save);
- seconds_to_first_step_warm: the same run again, the records read back from the cache;
- peak_rss_mb: the largest peak RSS of any one process of those runs (the training process, the encoding
  workers), from wait4's rusage;
- data_wait_share / data_wait_share_workers: the share of wall time after the first step that the loop spent
  waiting for its next batch, over `--steps` steps, with data.num_workers=0 and =--workers (`train`'s
  data_wait_share).
With --packing it measures instead the labelled tokens per second of `--steps`-step runs padded, with
data.group_by_length and with data.packing (alternating fresh runs, median of --repeats each; padded and packed
runs see the same records), on the first size's file.
The driver itself imports nothing heavy, so its own memory is not carried into the children's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

N_IMAGES, IMAGE_PX, PER_IMAGE = 300, 384, 10
ROOT = Path(__file__).resolve().parent


def prepare(work: Path, sizes: list[int]) -> dict:
    """(In a child process) the benchmark model, the images and the JSONL files, each made once."""
    sys.path.insert(0, str(ROOT))
    import common

    from tinyml_cli.demo import synth
    info = common.build(work / "model")
    data = work / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rng, pool = random.Random(0), []
    for i in range(N_IMAGES):
        objs = synth.random_scene(rng)
        img = data / "images" / f"{i:04d}.png"
        if not img.is_file():
            synth.draw_scene(objs, random.Random(i), size=IMAGE_PX).save(img)
        for _ in range(PER_IMAGE):
            turns = [synth.question(k, objs, rng) for k in rng.sample(synth.QUESTION_TYPES, rng.randint(3, 5))]
            conv = []
            for t, (q, a) in enumerate(turns):
                conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            pool.append(json.dumps({"image": img.relative_to(data).as_posix(), "conversations": conv})[1:])
    files = {}
    for n in sizes:
        path = data / f"train_{n}.jsonl"
        if not path.is_file():
            with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
                f.writelines(f'{{"id": "r{k}", {pool[k % len(pool)]}\n' for k in range(n))
            os.replace(path.with_suffix(".tmp"), path)
        files[n] = str(path)
    return {"model": info["tinyml"], "files": files}


def run_one(a, cmd_args: list[str]) -> tuple[float, float, str]:
    """Run a child, reaping it with wait4: (wall seconds, its peak RSS in MB, stdout)."""
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd_args, stdout=out, stderr=err,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, for its rusage (largest process of its tree)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.time() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd_args[:5]))} failed:\n{err.read().decode()[-3000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read().decode()


def sft_runner(a, model: str, train: str, out: Path):
    def sft_run(steps: int, workers: int, *extra: str) -> tuple[float, float, dict]:
        sets = [f"model.init_from={model}", f"data.train={train}", f"data.cache_dir={a.work / 'cache'}",
                f"data.num_proc={a.num_proc}", f"data.num_workers={workers}", f"train.max_steps={steps}",
                f"train.batch_size={a.batch_size}", "data.max_length=256", "train.log_every=1000", *extra]
        cmd = [sys.executable, "-m", "tinyml_cli", "sft", "--json", "--overwrite", "-o", str(out)]
        for s in sets:
            cmd += ["--set", s]
        seconds, rss, stdout = run_one(a, cmd)
        return seconds, rss, json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1])
    return sft_run


def packing(a, model: str, train: str, say) -> dict:
    """Labelled tokens/s of the same steps padded and packed, alternating fresh runs (warm cache)."""
    import statistics
    sft_run = sft_runner(a, model, train, a.work / "runs" / "packing")
    sft_run(1, 0)  # fills the cache
    settings = {"padded": "data.packing=false", "grouped": "data.group_by_length=true", "packed": "data.packing=true"}
    found = {k: [] for k in settings}
    for _ in range(a.repeats):
        for name, runs in found.items():
            runs.append(sft_run(a.steps, 0, settings[name])[2]["metrics"]["tokens_per_s"])
            say(f"{settings[name]}: {runs[-1]:.1f} labelled tokens/s")
    med = {k: statistics.median(v) for k, v in found.items()}
    return {**{f"tokens_per_s_{k}": round(v, 1) for k, v in med.items()},
            "gain_packed": round(med["packed"] / med["padded"], 3),
            "gain_grouped": round(med["grouped"] / med["padded"], 3), "runs": found}


def measure(a, model: str, train: str, n: int, say) -> dict:
    sft_run = sft_runner(a, model, train, a.work / "runs" / str(n))
    shutil.rmtree(a.work / "cache", ignore_errors=True)
    cold, rss_cold, _ = sft_run(1, 0)
    say(f"{n:,} records: first step cold {cold:.1f} s (peak RSS {rss_cold:.0f} MB)")
    warm, rss_warm, _ = sft_run(1, 0)
    say(f"{n:,} records: first step warm {warm:.1f} s (peak RSS {rss_warm:.0f} MB)")
    _, rss0, s0 = sft_run(a.steps, 0)
    _, rss_w, sw = sft_run(a.steps, a.workers)
    row = {"records": n, "seconds_to_first_step_cold": round(cold, 1), "seconds_to_first_step_warm": round(warm, 1),
           "peak_rss_mb": round(max(rss_cold, rss_warm, rss0, rss_w)),
           "data_wait_share": round(s0["metrics"]["data_wait_share"], 4),
           "data_wait_share_workers": round(sw["metrics"]["data_wait_share"], 4),
           "tokens_per_s": round(s0["metrics"]["tokens_per_s"], 1),
           "tokens_per_s_workers": round(sw["metrics"]["tokens_per_s"], 1)}
    say(f"{n:,} records: data wait {row['data_wait_share']:.1%} (0 workers), "
        f"{row['data_wait_share_workers']:.1%} ({a.workers} workers)")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--work", type=Path, default=Path("runs/data_scale"), help="folder for the model, data and cache")
    p.add_argument("--sizes", default="8000,80000,665000", help="records per data set, comma-separated")
    p.add_argument("--num-proc", type=int, default=2, help="data.num_proc: encoding processes")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers of the data-wait run with workers")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of each data-wait run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--packing", action="store_true", help="measure tokens/s with data.packing off and on instead")
    p.add_argument("--repeats", type=int, default=2, help="--packing: runs per setting")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.work = a.work.resolve()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.prepare:  # the child that builds what the runs need (torch and the model stay out of the driver)
        print(json.dumps(prepare(a.work, sizes)))
        return
    say = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr))
    say("building the model, images and data files (once)")
    _, _, out = run_one(a, [sys.executable, __file__, "--prepare", "--work", str(a.work), "--sizes", a.sizes])
    built = json.loads(out.strip().splitlines()[-1])
    if a.packing:
        found = packing(a, built["model"], built["files"][str(sizes[0])], say)
        print(json.dumps({"benchmark": "data_scale --packing", "steps": a.steps, "batch_size": a.batch_size,
                          "packing": found}) if a.json else
              f"labelled tokens/s: padded {found['tokens_per_s_padded']}, grouped by length "
              f"{found['tokens_per_s_grouped']} ({found['gain_grouped']}x), packed {found['tokens_per_s_packed']} "
              f"({found['gain_packed']}x)")
        return
    rows = [measure(a, built["model"], built["files"][str(n)], n, say) for n in sizes]
    result = {"benchmark": "data_scale", "num_proc": a.num_proc, "workers": a.workers, "cpus": os.cpu_count(),
              "batch_size": a.batch_size, "steps": a.steps, "images": N_IMAGES, "image_px": IMAGE_PX, "sizes": rows}
    if a.json:
        print(json.dumps(result))
        return
    print("| records | first step, cold cache (s) | warm (s) | peak RSS (MB) | data wait, 0 workers | "
          f"{a.workers} workers |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records']:,} | {r['seconds_to_first_step_cold']} | {r['seconds_to_first_step_warm']} | "
              f"{r['peak_rss_mb']} | {r['data_wait_share']:.1%} | {r['data_wait_share_workers']:.1%} |")


if __name__ == "__main__":
    main()
