"""pretrain-align and sft: supervised training of the parts a recipe names, on image conversations.

pretrain-align is stage 1 on captions (the connector alone by default, LLaVA / TinyLLaVA "base"; more parts with
train.parts, TinyLLaVA "share"); sft is
stage 2 (multi-turn conversations, loss on assistant tokens only), full, freeze or a peft method.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import UserError
from ..config import RunConfig, save_config
from ..core.loop import sft_step
from ..core.trainable import model_source


def run_sft(cfg: RunConfig, out_dir: str | Path, command: str, resume: bool = False, progress=None,
            status=None) -> dict:
    """Setup -> loop -> save for pretrain-align / sft; returns the JSON summary. `status(text)` hears what each
    phase before the first step is doing."""
    from ..core.batching import train_examples
    from ..core.loop import ExampleBatches, process_state, train
    from ..core.model import count_params
    from ..core.trainable import setup_model
    from ..records.encoder import encoder_for

    t0 = time.time()
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (a LLaVA-format JSON / JSONL file)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg)
    collate = model.collator()
    if cfg.data.packing:
        if type(collate).__name__ != "Collator" or hasattr(getattr(model, "connector", None), "media"):
            raise UserError("data.packing needs a composed model (not a model.vlm checkpoint or xattn)")
        collate.pack = True
    if cfg.data.streaming:
        source = streamed_source(cfg, encoder_for(model, cfg.data), collate)
    else:
        examples, skipped = train_examples(cfg.data, encoder_for(model, cfg.data), status)
        source = ExampleBatches(examples, collate, cfg.data.num_workers, cfg.data.group_by_length)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": command})
    status("first step (decoding its images)")
    trainable, total = count_params(model)
    stats = train(model, source, sft_step, cfg.train, out, resume=resume, progress=progress)
    if main_process:
        model.save(out)
    if cfg.data.streaming:  # the records taken from the stream, and the bad ones met on the way
        n_examples, skipped = source.stream.used, source.stream.skipped
    else:
        n_examples = len(examples)
    metrics = {**stats, "examples": n_examples, "skipped": len(skipped), "seconds": time.time() - t0}
    if skipped and main_process:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    artifacts = {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")}
    return {"command": command, "output_dir": str(out), "metrics": metrics, "artifacts": artifacts,
            "trainable_params": trainable, "total_params": total}


def streamed_source(cfg: RunConfig, encoder, collate):
    """`data.streaming`: the batch source over data.train read as a stream (records.stream)."""
    from ..core.loop import StreamBatches
    from ..records.conversations import parse_record
    from ..records.stream import RecordStream
    p = Path(cfg.data.train)
    root = p if p.is_dir() else p.parent
    seen: dict = {}  # image paths found so far (each is checked once, without being opened)
    stream = RecordStream(cfg.data.train, lambda rec: parse_record(rec, root, encoder, lazy=seen), cfg.train.seed,
                          cfg.data.stream_block, cfg.data.on_error, cfg.data.columns)
    return StreamBatches(stream, collate)
