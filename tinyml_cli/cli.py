"""The `tinyml` command line: each command loads its config, calls the core, and prints the summary.

Exit codes: 0 success, 2 user error (bad flag, recipe, data or path: one line, no traceback), 1 internal
error (set TINYML_DEBUG=1 for the traceback). Heavy libraries are imported inside the commands so that
`tinyml --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import UserError, __version__

app = typer.Typer(help="Post-train small multimodal LLMs (LLaVA / TinyLLaVA style) on one consumer GPU or a CPU.",
                  no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
data_app = typer.Typer(help="Make and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe: a file, or the name of a shipped recipe (tiny_sft).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set train.max_steps=100 (repeatable).")
OnnxOpt = typer.Option(None, "--onnx", help="Run a `tinyml export` ONNX folder with onnxruntime alone (no torch).")
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON object on stdout at the end (for scripts and CI).")


def _config(config, sets, defaults=None):
    from .config import load_config
    return load_config(config, sets or [], defaults)


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Never silently mix or overwrite runs: an existing run needs --resume or --overwrite."""
    import shutil
    if out.exists() and (out / "config.yaml").exists() and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)


def _train_command(command: str, config, sets, output_dir, json_mode, resume, overwrite, defaults):
    from . import ui
    from .sft import run_sft
    ui.quiet_libraries()
    cfg = _config(config, sets, defaults)
    out = Path(output_dir or f"runs/{command}")
    _prepare_output(out, resume, overwrite)
    con = ui.console(json_mode)
    from .train import process_state
    state = process_state()
    try:
        if state.is_main_process:
            with ui.training_bar(con, command) as bar:
                result = run_sft(cfg, out, command, resume=resume, progress=bar)
            ui.emit(result, json_mode)
        else:  # other processes of a multi-process run train silently
            run_sft(cfg, out, command, resume=resume)
    finally:
        # A gloo / NCCL group left alive at interpreter exit can abort the process ("terminate called...").
        state.destroy_process_group()


@app.command("pretrain-align")
def pretrain_align(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                   output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default runs/pretrain-align)."),
                   json_mode: bool = JsonOpt,
                   resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output folder."),
                   overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the output folder.")):
    """Stage 1: train only the connector on image captions (vision encoder and LLM frozen).

    Example: tinyml pretrain-align -c tiny_align -o runs/align
    """
    _train_command("pretrain-align", config, set_, output_dir, json_mode, resume, overwrite,
                   {"train.parts": ["connector"], "peft.method": "freeze"})


@app.command()
def sft(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default runs/sft)."),
        json_mode: bool = JsonOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output folder."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the output folder.")):
    """Stage 2: supervised fine-tuning on conversations, loss on assistant tokens only (full, freeze, LoRA or QLoRA).

    Example: tinyml sft -c tiny_sft -o runs/sft --set train.max_steps=500
    """
    _train_command("sft", config, set_, output_dir, json_mode, resume, overwrite,
                   {"train.parts": ["connector", "llm"], "train.lr": 2e-5})


@app.command("eval")
def eval_(model_dir: Optional[Path] = typer.Argument(None, help="A tinyml model folder (the output of a training command)."),
          data: Optional[str] = typer.Option(None, "--data", "-d", help="Held-out data (default: data.eval of the recipe)."),
          config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where predictions.jsonl and eval_metrics.json go."),
          json_mode: bool = JsonOpt, onnx: Optional[Path] = OnnxOpt):
    """Exact-match VQA accuracy (overall and per question type) and POPE metrics for a saved model.

    Example: tinyml eval runs/sft --data runs/shapes/eval.jsonl --json
    """
    from . import ui
    cfg = _config(config, set_)
    if data:
        cfg.data.eval = data
    if onnx:  # onnxruntime alone: torch is never imported
        from .onnx_runner import run_eval_onnx
        with ui.count_bar(ui.console(json_mode), "eval (onnx)") as bar:
            return ui.emit(run_eval_onnx(onnx, cfg, output_dir, progress=bar), json_mode)
    if model_dir is None:
        raise UserError("give a MODEL_DIR or --onnx DIR")
    from .evaluate import run_eval
    ui.quiet_libraries()
    with ui.count_bar(ui.console(json_mode), "eval") as bar:
        result = run_eval(str(model_dir), cfg, output_dir, progress=bar)
    ui.emit(result, json_mode)


@app.command()
def generate(model_dir: Optional[Path] = typer.Argument(None, help="A tinyml model folder."),
             prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction."),
             image: Optional[Path] = typer.Option(None, "--image", "-i", help="An image file."),
             config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt,
             delta: Optional[List[Path]] = typer.Option(None, "--delta", help="A BitDelta folder to serve over MODEL_DIR as base (repeatable: one answer per delta)."),
             onnx: Optional[Path] = OnnxOpt):
    """Answer a prompt about an image (greedy by default; --set gen.temperature=0.7 samples).

    Example: tinyml generate runs/sft --image runs/shapes/images/003000.png --prompt "What color is the circle?"
    """
    from . import ui
    img = str(image) if image else None
    if onnx:  # onnxruntime alone: torch is never imported
        from .onnx_runner import run_generate_onnx
        result = run_generate_onnx(onnx, img, prompt, _config(config, set_))
    elif model_dir is None:
        raise UserError("give a MODEL_DIR or --onnx DIR")
    elif delta:
        from .bitdelta_run import run_generate_deltas
        ui.quiet_libraries()
        result = run_generate_deltas(model_dir, delta, img, prompt, _config(config, set_))
    else:
        from .evaluate import run_generate
        ui.quiet_libraries()
        result = run_generate(str(model_dir), img, prompt, _config(config, set_))
    if json_mode:
        ui.emit(result, True)
    else:
        typer.echo("\n".join(f"{a['delta']}: {a['answer']}" for a in result["answers"]) if delta and len(delta) > 1
                   else result["answer"])


@app.command()
def merge(run_dir: Path = typer.Argument(..., help="A run folder trained with lora, dora, ia3, qlora or bitfit."),
          output_dir: Path = typer.Argument(..., help="Where the merged model folder goes."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
          json_mode: bool = JsonOpt):
    """Fold a run's adapters into full weights (QLoRA: into its dequantized base) as a plain model folder.

    Example: tinyml merge runs/sft runs/sft-merged
    """
    from . import ui
    from .merge import merge_run
    ui.quiet_libraries()
    ui.emit(merge_run(run_dir, output_dir, overwrite), json_mode)


@app.command("build-tiny")
def build_tiny(output_dir: Path = typer.Argument(Path("runs/tiny"), help="Where llm/ and vision/ are saved."),
               seed: int = typer.Option(1234, help="Seed of the pretraining data and weights."),
               llm_steps: int = typer.Option(200, help="Language-model pretraining steps of the LLM."),
               vision_steps: int = typer.Option(200, help="Contrastive pretraining steps of the vision tower."),
               scenes: int = typer.Option(4000, help="Synthetic scenes in the pretraining corpus."),
               json_mode: bool = JsonOpt):
    """Build the tiny default offline: a tokenizer, a Llama LLM and a SigLIP tower, briefly pretrained.

    Example: tinyml build-tiny runs/tiny
    """
    from . import ui
    from .tiny import build_tiny as build
    ui.quiet_libraries()
    con = ui.console(json_mode)
    with con.status("building the tiny default (tokenizer, LLM and vision pretraining)..."):
        figures = build(output_dir, seed=seed, llm_steps=llm_steps, vision_steps=vision_steps, n_scenes=scenes)
    ui.emit({"command": "build-tiny", "output_dir": str(output_dir), "metrics": figures,
             "artifacts": {"llm": figures.pop("llm"), "vision": figures.pop("vision")}}, json_mode)


@data_app.command("synth-shapes")
def synth_shapes(output_dir: Path = typer.Argument(..., help="Folder for images/, captions.jsonl, train.jsonl, eval.jsonl."),
                 n: int = typer.Option(8000, "--n", help="Training images."),
                 n_eval: int = typer.Option(200, "--n-eval", help="Held-out images (5 questions each)."),
                 seed: int = typer.Option(0, help="Random seed."), json_mode: bool = JsonOpt):
    """Synthetic shapes: captions (alignment), multi-turn VQA (sft) and a held-out split with POPE questions.

    Example: tinyml data synth-shapes runs/shapes --n 8000
    """
    from . import ui
    from .synth import synth_shapes as synth
    if n < 1 or n_eval < 1:
        raise UserError("--n and --n-eval must be at least 1")
    files = synth(output_dir, n=n, n_eval=n_eval, seed=seed)
    images = files.pop("images")
    ui.emit({"command": "data synth-shapes", "output_dir": str(output_dir), "metrics": {"images": images},
             "artifacts": files}, json_mode)


@data_app.command("validate")
def data_validate(file: Path = typer.Argument(..., help="A data set: JSON / JSONL, parquet file or folder, datasets folder or hub id."),
                  config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt):
    """Report every problem of a data set at once; exit 2 if there is any.

    Records, fields, images (fully decoded) and placeholders are checked; with model.llm and model.vision
    (or model.init_from) set, token lengths and truncation are checked too.

    Example: tinyml data validate runs/shapes/train.jsonl -c tiny_sft
    """
    from . import ui
    from .data import encoder_for, validate
    ui.quiet_libraries()
    cfg = _config(config, set_)
    enc = encoder_for(cfg) if cfg.model.init_from or cfg.model.llm else None
    n, problems = validate(file, enc, cfg.data.columns)
    con = ui.console(json_mode)
    from rich.markup import escape
    for p in problems:
        con.print(f"[red]x[/red] {escape(p)}")
    ui.emit({"command": "data validate", "output_dir": None, "artifacts": {}, "problems": problems,
             "metrics": {"records": n, "problems": len(problems), "tokens_checked": enc is not None}}, json_mode)
    if problems:
        raise typer.Exit(2)


@app.command()
def demo(output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", "-o", help="Folder for everything the demo makes."),
         quick: bool = typer.Option(False, "--quick", help="Smoke test: a few steps of every stage (accuracy is meaningless)."),
         full: bool = typer.Option(False, "--full", help="Add the later stages after sft: reward -> dpo -> ppo on hallucination pairs."),
         json_mode: bool = JsonOpt):
    """The whole pipeline on CPU in minutes: tiny default -> data -> pretrain-align -> sft -> eval (--full: -> reward -> dpo -> ppo).

    Example: tinyml demo --json
    """
    from . import ui
    from .demo import run_demo
    ui.quiet_libraries()
    result = run_demo(output_dir, ui.console(json_mode), quick=quick, full=full)
    ui.emit(result, json_mode)


bitdelta_app = typer.Typer(help="BitDelta: a fine-tuned model as 1-bit weight deltas over its base.", no_args_is_help=True)
app.add_typer(bitdelta_app, name="bitdelta")


@bitdelta_app.command("compress")
def bitdelta_compress(base: Path = typer.Argument(..., help="The base tinyml model folder (e.g. the pretrain-align run)."),
                      finetuned: Path = typer.Argument(..., help="The fine-tuned tinyml model folder (e.g. the sft run)."),
                      output_dir: Path = typer.Argument(..., help="Where the delta folder goes."),
                      config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt,
                      resume: bool = typer.Option(False, "--resume", help="Continue scale distillation from the latest checkpoint."),
                      overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing delta in the output folder.")):
    """Sign bits + one scale per linear weight of FINETUNED - BASE, scales distilled on data.train (train.* keys).

    Calibration and held-out data default to the fine-tuned run's data.train / data.eval.

    Example: tinyml bitdelta compress runs/align runs/sft runs/sft-delta --json
    """
    from . import ui
    from .bitdelta_run import compress_config, run_compress
    ui.quiet_libraries()
    cfg = compress_config(config, set_, finetuned)
    _prepare_output(output_dir, resume, overwrite)
    with ui.training_bar(ui.console(json_mode), "scale distillation") as bar:
        result = run_compress(cfg, base, finetuned, output_dir, resume=resume, progress=bar)
    ui.emit(result, json_mode)


@bitdelta_app.command("apply")
def bitdelta_apply(base: Path = typer.Argument(..., help="The base tinyml model folder the delta was made from."),
                   delta: Path = typer.Argument(..., help="A delta folder (from bitdelta compress)."),
                   output_dir: Path = typer.Argument(..., help="Where the merged tinyml model folder goes."),
                   json_mode: bool = JsonOpt,
                   overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model in the output folder.")):
    """Merge BASE + DELTA (W_base + scale * sign) into an ordinary tinyml model folder.

    Example: tinyml bitdelta apply runs/align runs/sft-delta runs/sft-bitdelta
    """
    import shutil

    from . import ui
    from .bitdelta_run import run_apply
    ui.quiet_libraries()
    if (output_dir / "tinyml_model.json").exists():
        if not overwrite:
            raise UserError(f"{output_dir} already holds a model: pass --overwrite to replace it")
        shutil.rmtree(output_dir)
    ui.emit(run_apply(base, delta, output_dir), json_mode)


@app.command()
def export(model_dir: Path = typer.Argument(..., help="A trained tinyml model folder (LoRA adapters are merged first)."),
           output_dir: Path = typer.Argument(..., help="Folder for the export."),
           format: str = typer.Option("onnx", "--format", "-f", help="onnx (for onnxruntime) | hf-llava (transformers LlavaForConditionalGeneration)."),
           dtype: str = typer.Option("fp32", "--dtype", help="ONNX weights and activations: fp32 | fp16."),
           json_mode: bool = JsonOpt):
    """Export a trained model: ONNX graphs (vision+connector, embeddings, KV-cache decoder) or a LLaVA checkpoint.

    Example: tinyml export runs/sft runs/onnx --format onnx
    """
    from . import ui
    from .edge import run_export
    ui.quiet_libraries()
    ui.emit(run_export(model_dir, output_dir, format, dtype), json_mode)


@app.command()
def quantize(source: Path = typer.Argument(..., help="An ONNX export (int4) or a tinyml model folder (nf4 / fp4 / int8)."),
             output_dir: Path = typer.Argument(..., help="Folder for the quantized copy."),
             method: str = typer.Option("int4", "--method", "-m", help="int4 (ONNX MatMulNBits) | nf4 | fp4 | int8 (bitsandbytes)."),
             block_size: int = typer.Option(32, "--block-size", help="int4: input channels per quantization block."),
             symmetric: bool = typer.Option(False, "--symmetric", help="int4: symmetric blocks (no zero points)."),
             accuracy_level: int = typer.Option(4, "--accuracy-level", help="int4: MatMulNBits compute, 4 int8 activations (faster on CPU) | 0 fp32."),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="Held-out data: evaluate before and after."),
             config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt):
    """Quantize a model and report file sizes and, with --data, the eval change against the unquantized model.

    Example: tinyml quantize runs/onnx runs/onnx-int4 --block-size 32 --data runs/shapes/eval.jsonl
    """
    from . import ui
    from .edge import run_quantize
    if method != "int4":  # bitsandbytes goes through transformers; the int4 path stays torch-free
        ui.quiet_libraries()
    ui.emit(run_quantize(source, output_dir, method, block_size, symmetric, data, _config(config, set_), accuracy_level),
            json_mode)


@app.command()
def estimate(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt,
             device: str = typer.Option("auto", "--device", help="cuda (a bf16 GPU) | cpu | auto (this machine's): what the estimate is for and where --measure runs."),
             gpu: float = typer.Option(24, "--gpu", help="Card size in GiB the advice aims at."),
             image_size: int = typer.Option(0, "--image-size", help="Image resolution (0: the vision config's)."),
             infer: bool = typer.Option(False, "--infer", help="Estimate inference with a KV cache instead of training."),
             context: int = typer.Option(2048, "--context", help="--infer: tokens per sequence in the KV cache."),
             kv_bytes: int = typer.Option(2, "--kv-bytes", help="--infer: bytes per KV cache element (2 bf16, 1 fp8)."),
             measure: bool = typer.Option(False, "--measure", help="Also run two real training steps here and report the measured peak.")):
    """VRAM planner: memory of a training step (or inference) by component, which cards it fits, how to make it fit.

    Example: tinyml estimate --set model.llm=examples/configs/tinyllama-1.1b --set model.vision=examples/configs/siglip-so400m-patch14-384 --set peft.method=lora
    """
    from . import ui
    from .estimate import Setting, report, run_estimate
    ui.quiet_libraries()
    cfg = _config(config, set_, {"train.parts": ["connector", "llm"]})  # sft's defaults
    setting = Setting(device=device, mode="infer" if infer else "train", batch=cfg.train.batch_size, seq=cfg.data.max_length,
                      checkpointing=cfg.train.gradient_checkpointing, optimizer=cfg.train.optimizer, context=context,
                      kv_bytes=kv_bytes, image_size=image_size)
    result = run_estimate(cfg, setting, gpu, measure)
    ui.emit(result, True) if json_mode else report(ui.console(False), result)


@app.command()
def report(run_dirs: List[Path] = typer.Argument(..., help="Run folders (metrics.jsonl, eval_metrics.json, estimate.json), or folders of runs."),
           output_dir: Path = typer.Option(Path("runs/report"), "--output-dir", "-o", help="Where report.html and the PNG figures go."),
           json_mode: bool = JsonOpt):
    """Figures (loss, lr, objective metrics, eval, memory) and a self-contained report.html from runs.

    Example: tinyml report runs/demo/align runs/demo/sft -o runs/report
    """
    from . import ui
    from .report import make_report, runs_table
    result = make_report(run_dirs, output_dir)
    con = ui.console(json_mode)
    con.print(runs_table(result["runs"]))
    ui.emit(result, json_mode)


recipes_app = typer.Typer(help="The recipes shipped with tinyml.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list(json_mode: bool = JsonOpt):
    """Each shipped recipe with the command line it opens with.

    Example: tinyml recipes list
    """
    from . import ui
    from .shipped import shipped_recipes
    found = shipped_recipes()
    if json_mode:
        ui.emit({"command": "recipes list", "output_dir": None, "metrics": {"recipes": len(found)},
                 "artifacts": {}, "recipes": found}, True)
        return
    from rich.table import Table
    table = Table(title="shipped recipes (use with -c NAME)", header_style="bold")
    table.add_column("name")
    table.add_column("runs with")
    for r in found:
        table.add_row(r["name"], r["command"])
    ui.console(False).print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="A shipped recipe's name (see `tinyml recipes list`).")):
    """Print a shipped recipe, to copy and edit.

    Example: tinyml recipes show tiny_sft > my_sft.yaml
    """
    from .shipped import recipe_text
    typer.echo(recipe_text(name), nl=False)


@recipes_app.command("keys")
def recipes_keys(json_mode: bool = JsonOpt):
    """Every recipe key with its default and what it means.

    Example: tinyml recipes keys | grep train.
    """
    from . import ui
    from .config import RunConfig, all_keys
    defaults = RunConfig().to_dict()
    rows = [(k, defaults[k.split(".")[0]][k.split(".", 1)[1]], h) for k, h in all_keys().items()]
    if json_mode:
        ui.emit({"command": "recipes keys", "output_dir": None, "metrics": {"keys": len(rows)}, "artifacts": {},
                 "keys": {k: {"default": d, "help": h} for k, d, h in rows}}, True)
        return
    for k, d, h in rows:
        typer.echo(f"{k:32} {str(d):14} {h}")


# ------------------------------------------------------------------------------------ preference stages
reward_app = typer.Typer()  # help: the docstring of its callback below
app.add_typer(reward_app, name="reward")


def _pref_command(command: str, config, sets, output_dir, json_mode, resume, overwrite, run):
    from . import ui
    ui.quiet_libraries()
    cfg = _config(config, sets, {"train.parts": ["connector", "llm"]})
    out = Path(output_dir or f"runs/{command}")
    _prepare_output(out, resume, overwrite)
    with ui.training_bar(ui.console(json_mode), command) as bar:
        result = run(cfg, out, progress=bar, **({"resume": resume} if resume else {}))
    ui.emit(result, json_mode)


@reward_app.callback(invoke_without_command=True)
def reward(ctx: typer.Context, config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
           output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default runs/reward)."),
           json_mode: bool = JsonOpt,
           resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output folder."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the output folder.")):
    """Reward model: the LMM with a scalar head on the last response token, Bradley-Terry loss on chosen / rejected.

    Example: tinyml reward -c tiny_reward -o runs/reward
    """
    if ctx.invoked_subcommand is not None:
        return
    from .reward import run_reward
    _pref_command("reward", config, set_, output_dir, json_mode, resume, overwrite, run_reward)


@reward_app.command("score")
def reward_score(data: Path = typer.Argument(..., help="Preference JSONL (image, prompt, chosen, rejected)."),
                 model_dir: Path = typer.Option(..., "--model", "-m", help="A reward model folder (tinyml reward)."),
                 scores: Optional[Path] = typer.Option(None, "--output", help="Write one JSON line of scores per pair here."),
                 config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt, json_mode: bool = JsonOpt):
    """Score the chosen and rejected answers of every pair; reports pairwise accuracy and mean margin.

    Example: tinyml reward score runs/prefs/pref_eval.jsonl --model runs/reward --json
    """
    from . import ui
    from .reward import run_score
    ui.quiet_libraries()
    ui.emit(run_score(model_dir, data, _config(config, set_), scores), json_mode)


@app.command()
def dpo(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default runs/dpo)."),
        json_mode: bool = JsonOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output folder."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the output folder.")):
    """Direct preference optimisation (pref.loss_type sigmoid = DPO, ipo = IPO; pref.label_smoothing > 0 = cDPO).

    Example: tinyml dpo -c tiny_dpo -o runs/dpo --set pref.beta=0.1
    """
    from .dpo import run_dpo
    _pref_command("dpo", config, set_, output_dir, json_mode, resume, overwrite, run_dpo)


@app.command()
def ppo(config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default runs/ppo)."),
        json_mode: bool = JsonOpt,
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the output folder.")):
    """PPO (RLHF): sample, score (exact_match or a reward model folder), KL-penalised GAE, clipped policy / value losses.

    Example: tinyml ppo -c tiny_ppo -o runs/ppo --set ppo.reward=runs/reward
    """
    from .ppo import run_ppo
    _pref_command("ppo", config, set_, output_dir, json_mode, False, overwrite, run_ppo)


@data_app.command("synth-preferences")
def synth_preferences(output_dir: Path = typer.Argument(..., help="Folder for images/, pref_train.jsonl, pref_eval.jsonl, pope_probe.jsonl."),
                      n: int = typer.Option(24000, "--n", help="Training pairs (one scene each)."),
                      n_eval: int = typer.Option(1000, "--n-eval", help="Held-out pairs."),
                      n_probe: int = typer.Option(1000, "--n-probe", help="Held-out POPE probe questions (three-object scenes)."),
                      seed: int = typer.Option(1, help="Random seed (differs from synth-shapes' default)."),
                      json_mode: bool = JsonOpt):
    """Hallucination preference pairs on new shapes scenes: the rejected answer swaps in a wrong colour, shape, count, side or an absent object.

    Example: tinyml data synth-preferences runs/prefs --n 24000
    """
    from . import ui
    from .synth import synth_preferences as synth
    if n < 1 or n_eval < 0 or n_probe < 0:
        raise UserError("--n must be at least 1, --n-eval and --n-probe at least 0")
    files = synth(output_dir, n=n, n_eval=n_eval, n_probe=n_probe, seed=seed)
    images = files.pop("images")
    ui.emit({"command": "data synth-preferences", "output_dir": str(output_dir), "metrics": {"images": images},
             "artifacts": files}, json_mode)


def version_callback(value: bool):
    if value:
        typer.echo(f"tinyml {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Show the version and exit.")):
    """tinyml: post-train small multimodal LLMs and ship them to 8-24 GB GPUs and CPUs."""


def main() -> None:
    import logging
    # bitsandbytes warns on every CPU import that an optional kernels package is missing; its fallback is used
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        rc = app(standalone_mode=False)  # click returns an Exit's code here instead of raising it
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: training diverged: {e}; the last good checkpoint is kept", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        # A reader that stopped early (`tinyml --help | head`, `| grep -q`) is no failure of ours, but rich and
        # click answer the broken pipe with exit 1, which fails such pipelines under `set -o pipefail`.
        if isinstance(e.__context__, BrokenPipeError):
            sys.exit(0)
        raise
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into an exit code
        # Typer ships its own copy of click, so its usage errors are recognised by what they do.
        if type(e).__name__ == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if type(e).__name__ == "Abort":
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("TINYML_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (TINYML_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
