"""One training loop for every objective, on accelerate: devices, mixed precision, multi-process, resume.

An objective plugs in as a batch source and a step function. The source says how many optimizer steps the run
has and yields its micro-batches (`ExampleBatches`: encoded records in a seeded order; PPO: its rollouts); the
`step_fn(model, batch) -> (loss, n_units, metrics)` gives a loss that is a mean over n_units units (labelled
tokens, pairs...); an optimizer step's loss is the mean over all the units of its micro-batches and processes.
A checkpoint holds the source's state too, so a run resumed from it sees exactly the batches an uninterrupted
run would.
Checkpoints (trainable weights, optimizer, scheduler, RNG, step) are written to a temporary folder and
renamed into place, so a half-written one is never taken as the latest.
With `train.optimizer_in_backward` each weight takes its AdamW step inside the backward pass (see
`step_in_backward`), so gradients of the whole model never exist at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from .. import UserError

CKPT_DIR = "checkpoints"


def mixed_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


def process_state():
    """accelerate's view of the processes of this run (one, or several under torchrun / accelerate launch).

    On a machine without a GPU accelerate takes several processes for a multi-CPU (gloo) run only when told
    `cpu=True`; otherwise each process would train alone on its shard and all would write the same files.
    """
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


GROUP = 64  # data.group_by_length: global batches per group of records sorted by length


class MicroBatchOrder:
    """Micro-batch k of a run as (epoch, record indices), computed on demand: each epoch is a seeded permutation,
    each global batch of batch_size*world records split by rank (a last global batch that is not full is
    dropped, unless the data set is smaller than one). With `lengths` (data.group_by_length) each run of
    GROUP global batches of the permutation is sorted by record length, cut into batches and those shuffled:
    batches of similar lengths, so less padding, in an order still random."""

    def __init__(self, n_examples: int, batch_size: int, world: int, rank: int, seed: int, lengths=None):
        self.n, self.bs, self.world, self.rank, self.seed = n_examples, batch_size, world, rank, seed
        gb = batch_size * world
        self.per_epoch = len(range(0, n_examples - gb + 1 if n_examples >= gb else 1, gb))
        self._perm, self.lengths = (None, None), lengths

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return perm
        gb, out = self.bs * self.world, []
        for s in range(0, len(perm), GROUP * gb):
            group = sorted(perm[s:s + GROUP * gb], key=lambda i: self.lengths[i])
            batches = [group[i:i + gb] for i in range(0, len(group), gb)]
            full = len(group) // gb  # a last batch that is not full stays last (and is dropped, as unsorted)
            out += [i for b in torch.randperm(full, generator=g).tolist() for i in batches[b]]
            out += group[full * gb:]
        return out

    def __getitem__(self, k: int) -> tuple[int, list[int]]:
        epoch, j = divmod(k, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, self._order(epoch))
        gb = self.bs * self.world
        chunk = self._perm[1][j * gb:(j + 1) * gb]
        return epoch, chunk[self.rank::self.world] or chunk[:self.bs]


class _Collated:
    """Micro-batch k collated: what DataLoader workers make ahead of the step (a map-style data set)."""

    def __init__(self, examples, collate, order: MicroBatchOrder):
        self.examples, self.collate, self.order = examples, collate, order

    def __getitem__(self, k: int):
        epoch, idx = self.order[k]
        try:
            return {"epoch": epoch}, self.collate([self.examples[i] for i in idx])
        except UserError as e:  # a worker's exception would come back with its traceback: keep the one line
            return {"error": str(e)}, None


class ExampleBatches:
    """The batch source of supervised and preference objectives: records in a seeded permutation per epoch, each
    global batch of batch_size x processes split by rank, collated one micro-batch at a time, in the training
    process or (num_workers > 0) ahead of it in DataLoader workers; the batches are the same either way."""

    def __init__(self, examples, collate, num_workers: int = 0, group_by_length: bool = False):
        self.examples, self.collate, self.done, self.num_workers = examples, collate, 0, num_workers
        self.lengths = None
        if group_by_length:
            self.lengths = getattr(examples, "lengths", None)
            if self.lengths is None:
                self.lengths = [len(e.input_ids) for e in examples]

    def steps(self, tcfg, world: int) -> int:
        return total_steps(tcfg, len(self.examples), world)

    def batches(self, acc, tcfg, model):
        order = MicroBatchOrder(len(self.examples), tcfg.batch_size, acc.num_processes, acc.process_index, tcfg.seed,
                                self.lengths)
        data = _Collated(self.examples, self.collate, order)
        if self.num_workers:  # the order starts where the run stopped: a resumed run sees the same batches
            from torch.utils.data import DataLoader
            items = iter(DataLoader(data, batch_size=None, sampler=itertools.count(self.done),
                                    num_workers=self.num_workers, prefetch_factor=4,
                                    pin_memory=torch.cuda.is_available()))
        else:
            items = (data[k] for k in itertools.count(self.done))
        for info, batch in items:
            if "error" in info:
                raise UserError(info["error"])
            self.done += 1
            yield info, batch

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


class StreamBatches:
    """The batch source of `data.streaming`: records taken from a `records.stream.RecordStream` in its order, each
    global batch of batch_size x processes split by rank and collated in the training process. Its state is the
    stream's position, so a resumed run takes the records an uninterrupted one would."""

    def __init__(self, stream, collate):
        self.stream, self.collate = stream, collate

    def steps(self, tcfg, world: int) -> int:
        return tcfg.max_steps  # a stream's length is unknown: the recipe check asks for train.max_steps

    def batches(self, acc, tcfg, model):
        records = iter(self.stream)
        world, rank = acc.num_processes, acc.process_index
        while True:
            chunk = list(itertools.islice(records, tcfg.batch_size * world))
            yield {"epoch": self.stream.epoch}, self.collate(chunk[rank::world] or chunk[:tcfg.batch_size])

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def fsdp_on_cpu(acc) -> bool:
    """`accelerate launch` with an FSDP config on a machine without GPUs: accelerate turns FSDP on only for GPU
    back-ends and falls back to DDP over gloo (MULTI_CPU), so the loop shards the model itself with FSDP2."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.num_processes > 1
            and acc.distributed_type == "MULTI_CPU")


def shard(model, world: int) -> None:
    """FSDP2 (`fully_shard`) over the CPU processes: each transformer layer (the classes a Hugging Face model
    names in `_no_split_modules`, accelerate's TRANSFORMER_BASED_WRAP) is a unit of its own, the rest one unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    layers = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    for m in model.modules():
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_states(model, opt) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state of a sharded model, whole, on rank 0 (every rank calls it;
    the others get empty dicts). Optimizer states are keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    weights, optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: v.contiguous() for n, v in weights.items() if n in keep}, optim


def unshard(model) -> None:
    """Whole tensors back in place of the FSDP2 shards once training is over, so that rank 0 saves the model as
    one process would (every rank calls it: each gathers every weight)."""
    from torch.distributed.tensor import DTensor
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                m._parameters[name] = torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)


def save_checkpoint(out_dir: Path, step: int, model, opt, sched, keep_last: int, source=None,
                    states: tuple | None = None) -> Path:
    """Write a checkpoint; `states` are (trainable weights, optimizer state) when the caller gathered them
    (a sharded model), else they are read from model and opt."""
    from safetensors.torch import save_file
    weights, optim = states or (trainable_state(model), opt.state_dict())
    root = out_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": sched.state_dict(), "rng": _rng_state(),
                    "source": source.state_dict() if source is not None else {}}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint at step {step} ({e.strerror or e}); "
                        f"the previous checkpoint is intact") from None
    for old in sorted(root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [p for p in sorted((out_dir / CKPT_DIR).glob("step-*")) if (p / "meta.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model, opt, sched, source=None, sharded: bool = False) -> int:
    from safetensors.torch import load_file
    state = load_file(str(ckpt / "trainable.safetensors"))
    st = torch.load(ckpt / "state.pt", weights_only=True)
    if sharded:  # every rank reads the whole checkpoint and keeps its shards
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )
        set_state_dict(model, opt, model_state_dict=state, optim_state_dict=st["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
        opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    _set_rng_state(st["rng"])
    if source is not None:
        source.load_state_dict(st["source"])
    return json.loads((ckpt / "meta.json").read_text())["step"]


def step_in_backward(params: list, opt) -> list:
    """Optimizer-in-backward (torchtune's name for it): a weight takes its optimizer step as soon as its gradient
    is complete, and the gradient is dropped at once, so no full set of gradients is ever held.

    One optimizer over all weights is kept, so the scheduler and checkpoints are unchanged: `opt.step()` updates
    only weights that hold a gradient, and inside this hook that is the one weight whose gradient just finished.
    That holds for torch's AdamW and for bitsandbytes' 8-bit and paged AdamW (each skips weights without a
    gradient), so it serves every method and objective. Returns the hook handles.
    """
    def hook(p):
        opt.step()
        p.grad = None
    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def total_steps(tcfg, n_examples: int, world: int = 1) -> int:
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    per_step = tcfg.batch_size * tcfg.grad_accum * world
    return max(1, math.ceil(tcfg.epochs * n_examples / per_step))


def optimizer(params, tcfg):
    """train.optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW (blockwise-quantized states), paged or not."""
    from torch.distributed.tensor import DTensor
    kw = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}
    if tcfg.optimizer == "adamw":
        # torch's fused AdamW (one kernel per weight, CPU and CUDA) is faster than its per-op loop, same update;
        # FSDP2's sharded weights take the per-op loop
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor)
                    for p in params)
        return torch.optim.AdamW(params, fused=fused, **kw)
    import bitsandbytes as bnb
    return (bnb.optim.PagedAdamW8bit if tcfg.optimizer.startswith("paged") else bnb.optim.AdamW8bit)(params, **kw)


def sft_step(model, batch):
    """The next-token objective (sft, pretrain-align): the model's mean loss over labelled tokens."""
    loss = model(**batch)
    return loss, int((batch["labels"][:, 1:] != -100).sum()), {}


def train(model, source, step_fn, tcfg, out_dir: Path, resume: bool = False, progress=None,
          accelerator=None) -> dict:
    """Run the optimizer loop over a batch source (e.g. `ExampleBatches`); returns figures (losses, steps,
    tokens/s, seconds). Metrics a batch carries under "metrics" (a source's own, e.g. PPO's rollout statistics)
    are logged beside the step's."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from . import tracking
    from .offload import offloader
    report_to = tracking.trackers(tcfg.report_to)
    acc = accelerator or Accelerator(mixed_precision=mixed_precision(tcfg.mixed_precision),
                                     cpu=not torch.cuda.is_available(),  # see process_state
                                     log_with=report_to or None, project_dir=out_dir)
    sharded = fsdp_on_cpu(acc)
    if sharded:
        shard(model, acc.num_processes)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the recipe leaves every parameter frozen")
    in_backward = tcfg.optimizer_in_backward
    if in_backward and acc.num_processes > 1:  # the rest of what it needs is checked when the recipe loads
        raise UserError("train.optimizer_in_backward needs one process (gradients are averaged across processes "
                        "after the backward pass)")
    opt = optimizer(params, tcfg)
    hooks = step_in_backward(params, opt) if in_backward else []
    offload = offloader(model, tcfg.offload_activations)
    steps = source.steps(tcfg, acc.num_processes)
    sched = get_scheduler(tcfg.scheduler if tcfg.scheduler != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=int(tcfg.warmup_ratio * steps), num_training_steps=steps)
    if not sharded:  # (accelerate would wrap a sharded model in DDP)
        model, opt = acc.prepare(model, opt)
    start = 0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out_dir / CKPT_DIR}")
        start = load_checkpoint(ckpt, acc.unwrap_model(model), opt, sched, source, sharded)
    else:
        torch.manual_seed(tcfg.seed)
        random.seed(tcfg.seed)
    batches = source.batches(acc, tcfg, acc.unwrap_model(model))

    tracking.start(acc, report_to, tcfg, out_dir)
    model.train()
    log = open(out_dir / "metrics.jsonl", "a" if resume else "w", encoding="utf-8") if acc.is_main_process else None
    losses, tokens, t0 = [], 0, time.time()
    waited, first_done = 0.0, None  # data wait after the first step (whose batch also waits for workers to start)
    last_metrics = {}
    world = acc.num_processes
    whole = tcfg.grad_accum == 1 and world == 1  # each step is one micro-batch: its mean loss is the step's
    for step in range(start, steps):
        units, loss_sum, step_metrics, source_metrics = 0, 0.0, {}, {}
        for micro in range(tcfg.grad_accum):
            t_wait = time.perf_counter()
            info, batch = next(batches)
            if first_done is not None:
                waited += time.perf_counter() - t_wait
            source_metrics = info
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            ctx = acc.no_sync(model) if micro < tcfg.grad_accum - 1 else contextlib.nullcontext()
            with ctx, acc.autocast(), offload.forward() if offload else contextlib.nullcontext():
                loss, n, metrics = step_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
            # The sum of this micro-batch's unit losses; divided by the step's units (all micro-batches, all
            # processes) below, so the step's gradient is that of the per-unit mean over the whole step, whatever
            # each micro-batch holds (transformers' Trainer counts labelled tokens over the accumulation the same
            # way). With one micro-batch on one process (always so for optimizer_in_backward, which steps inside
            # this backward) the plain mean is that already.
            acc.backward(loss if whole else loss * n)
            units += int(n)
            loss_sum += loss.item() * n
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / tcfg.grad_accum
        if world > 1:  # one all-reduce per step: the step's units and summed loss over every process
            units, loss_sum = acc.reduce(torch.tensor([float(units), loss_sum], device=acc.device),
                                         reduction="sum").tolist()
        tokens += int(units)
        step_loss = loss_sum / max(units, 1)
        if not whole:
            # DDP has averaged the summed losses' gradients over the processes: x world / units makes them the
            # gradient of the step's per-unit mean.
            scale = world / max(units, 1)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        grad_norm = acc.clip_grad_norm_(params, tcfg.max_grad_norm) if tcfg.max_grad_norm > 0 else None
        if hasattr(grad_norm, "full_tensor"):  # the norm over FSDP2 shards
            grad_norm = grad_norm.full_tensor()
        if not in_backward:  # else every weight has taken its step during the backward pass
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        first_done = first_done or time.perf_counter()
        tps = tokens / max(time.time() - t0, 1e-9)
        last_metrics = {"step": step + 1, **source_metrics, "loss": step_loss, "lr": sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tps, **step_metrics}
        if (step + 1) % tcfg.log_every == 0 or step + 1 == steps or step == start:
            if log:
                log.write(json.dumps(last_metrics) + "\n")
                log.flush()
            tracking.log(acc, report_to, last_metrics)
        if progress:
            progress(step + 1, steps, step_loss, tps)
        if tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 < steps:
            states = full_states(model, opt) if sharded else None  # gathered by every rank
            if acc.is_main_process:
                save_checkpoint(out_dir, step + 1, acc.unwrap_model(model), opt, sched, tcfg.keep_last, source,
                                states)
    batches.close()  # stops DataLoader workers now rather than when garbage-collected
    if sharded:
        unshard(model)
    for h in hooks:
        h.remove()
    if log:
        log.close()
    if report_to:
        acc.end_training()
    seconds = time.time() - t0
    return {"steps": steps, "resumed_from": start, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "tokens_per_s": tokens / max(seconds, 1e-9),
            "train_seconds": seconds, "processes": world, "fsdp2_on_cpu": sharded,
            "data_wait_share": waited / max(time.perf_counter() - first_done, 1e-9) if first_done else 0.0,
            **{k: v for k, v in last_metrics.items() if k not in ("step", "epoch", "loss")}}


@contextlib.contextmanager
def processes():
    """The processes of a training run (one, or several under torchrun / accelerate launch): yields accelerate's
    state; rank 0 writes the outputs while the others wait for it, then the process group is torn down (a gloo /
    NCCL group left alive at interpreter exit can abort the process)."""
    state = process_state()
    try:
        yield state
        state.wait_for_everyone()
    finally:
        state.destroy_process_group()
