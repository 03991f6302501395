"""The `tinyml` command line: one thin function per command: parse, call the stage, print the result.

Exit codes: 0 success, 2 user error (bad flag, recipe, data or path: one line, no traceback), 1 internal
error (set TINYML_DEBUG=1 for the traceback). Heavy libraries are imported inside the commands so that
`tinyml --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import UserError, __version__

app = typer.Typer(help="Post-train small multimodal LLMs (LLaVA / TinyLLaVA style) on one consumer GPU or a CPU.",
                  no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
data_app = typer.Typer(help="Make and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
bitdelta_app = typer.Typer(help="BitDelta: a fine-tuned model as 1-bit weight deltas over its base.", no_args_is_help=True)
app.add_typer(bitdelta_app, name="bitdelta")
recipes_app = typer.Typer(help="The recipes shipped with tinyml.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
reward_app = typer.Typer()  # help: the docstring of its callback below
app.add_typer(reward_app, name="reward")

# The option blocks commands share, declared once.
Config = Annotated[Optional[str], typer.Option("--config", "-c", metavar="RECIPE", help="YAML recipe: a file, or the name of a shipped recipe (see `tinyml recipes list`).")]


def _sets(example: str):
    return Annotated[Optional[List[str]], typer.Option("--set", "-s", metavar="KEY=VALUE", help=f"Override a recipe key, e.g. --set {example} (repeatable).")]


TrainSets = _sets("train.max_steps=100")
GenSets = _sets("gen.max_new_tokens=32")
DataSets = _sets("data.max_length=256")
PlanSets = _sets("peft.method=lora")
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout at the end (for scripts and CI).")]
Onnx = Annotated[Optional[Path], typer.Option("--onnx", metavar="DIR", help="Run a `tinyml export` ONNX folder with onnxruntime alone (no torch).")]
RunDir = Annotated[Optional[Path], typer.Option("--output-dir", "-o", metavar="DIR", help="Run folder (default runs/COMMAND).")]
OutDir = Annotated[Optional[Path], typer.Option("--output-dir", "-o", metavar="DIR", help="The output folder, instead of OUTPUT_DIR.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in the output folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace what the output folder holds.")]


def _out_arg(help: str):
    return Annotated[Optional[Path], typer.Argument(metavar="OUTPUT_DIR", show_default=False, help=f"{help} (or -o DIR).")]


def _output(arg: Optional[Path], opt: Optional[Path], default: Optional[Path] = None) -> Path:
    """The output folder, given as the OUTPUT_DIR argument or as -o/--output-dir."""
    if arg is not None and opt is not None and arg != opt:
        raise UserError(f"two output folders given ({arg} and -o {opt}): give one")
    out = arg if arg is not None else opt if opt is not None else default
    if out is None:
        raise UserError("give the output folder: OUTPUT_DIR or -o DIR")
    return out


def _config(config, sets, defaults=None):
    from .config import load_config
    return load_config(config, sets or [], defaults)


def _train(command: str, run, config, sets, output_dir, json_mode, resume, overwrite, defaults) -> None:
    """Every training command: recipe, the checks that need no model (data, model folders, output folder), then
    the stage; with several processes, rank 0 shows progress and prints the result while the others train
    silently. A run that fails leaves no empty output folder."""
    from .stages.checks import check_run, run_inputs
    from .stages.outputs import prepare_output, removed_if_left_empty
    cfg = _config(config, sets, defaults)
    check_run(cfg, command)
    out = prepare_output(output_dir or f"runs/{command}", resume, overwrite, inputs=run_inputs(cfg))
    from . import ui
    ui.quiet_libraries()
    from .core.loop import processes
    with removed_if_left_empty(out), processes() as state:
        if state.is_main_process:
            with ui.training_bar(ui.console(json_mode), command) as bar:
                result = run(cfg, out, resume=resume, progress=bar, status=bar.status)
            ui.emit(result, json_mode)
        else:
            run(cfg, out, resume=resume)


def _sft(command):
    def run(cfg, out, resume=False, progress=None, status=None):
        from .stages.sft import run_sft
        return run_sft(cfg, out, command, resume=resume, progress=progress, status=status)
    return run


def _dpo(cfg, out, resume=False, progress=None, status=None):
    from .stages.dpo import run_dpo
    return run_dpo(cfg, out, resume=resume, progress=progress, status=status)


def _ppo(cfg, out, resume=False, progress=None, status=None):
    from .stages.ppo import run_ppo
    return run_ppo(cfg, out, resume=resume, progress=progress, status=status)


def _halva(cfg, out, resume=False, progress=None, status=None):
    from .stages.halva import run_halva
    return run_halva(cfg, out, resume=resume, progress=progress)


def _grpo(command):
    def run(cfg, out, resume=False, progress=None, status=None):
        from .stages.grpo import run_grpo
        return run_grpo(cfg, out, command, resume=resume, progress=progress, status=status)
    return run


def _kto(cfg, out, resume=False, progress=None, status=None):
    from .stages.kto import run_kto
    return run_kto(cfg, out, resume=resume, progress=progress, status=status)


def _reward(cfg, out, resume=False, progress=None, status=None):
    from .stages.reward import run_reward
    return run_reward(cfg, out, resume=resume, progress=progress, status=status)


PREF_DEFAULTS = {"train.parts": ["connector", "llm"]}


@app.command("pretrain-align")
def pretrain_align(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
                   resume: Resume = False, overwrite: Overwrite = False):
    """Stage 1: train on image captions (the connector alone unless train.parts says more).

    The connector alone is LLaVA / TinyLLaVA's "base" recipe; connector, LLM and vision together are TinyLLaVA's
    "share" recipe; the tiny default's tiny_align trains the connector and the LLM.

    Example: tinyml pretrain-align -c tiny_align -o runs/align
    """
    _train("pretrain-align", _sft("pretrain-align"), config, set_, output_dir, json_mode, resume, overwrite,
           {"train.parts": ["connector"], "peft.method": "freeze"})


@app.command()
def sft(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
        resume: Resume = False, overwrite: Overwrite = False):
    """Stage 2: supervised fine-tuning on conversations, loss on assistant tokens only.

    peft.method: full, freeze (train.parts), lora, qlora, dora, ia3, bitfit, adapter, prompt-tuning, prefix-tuning,
    llama-adapter or tinytl (see `tinyml recipes keys`).

    Example: tinyml sft -c tiny_sft -o runs/sft --set train.max_steps=500
    """
    _train("sft", _sft("sft"), config, set_, output_dir, json_mode, resume, overwrite,
           {"train.parts": ["connector", "llm"], "train.lr": 2e-5})


@reward_app.callback(invoke_without_command=True)
def reward(ctx: typer.Context, config: Config = None, set_: TrainSets = None, output_dir: RunDir = None,
           json_mode: Json = False, resume: Resume = False, overwrite: Overwrite = False):
    """Reward model: the LMM with a scalar head on the last response token, Bradley-Terry loss on chosen / rejected.

    Example: tinyml reward -c tiny_reward -o runs/reward
    """
    if ctx.invoked_subcommand is None:
        _train("reward", _reward, config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def dpo(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
        resume: Resume = False, overwrite: Overwrite = False):
    """Preference pairs: pref.loss_type sigmoid (DPO), ipo, simpo, orpo (no reference) or mdpo (image-conditional).

    pref.label_smoothing > 0 = cDPO, pref.rpo_alpha > 0 adds the chosen answer's NLL (RPO).

    Example: tinyml dpo -c tiny_dpo -o runs/dpo --set pref.loss_type=mdpo
    """
    _train("dpo", _dpo, config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def ppo(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
        resume: Resume = False, overwrite: Overwrite = False):
    """PPO (RLHF): sample, score (exact_match or a reward model folder), KL-penalised GAE, clipped policy / value losses.

    Example: tinyml ppo -c tiny_ppo -o runs/ppo --set ppo.reward=runs/reward
    """
    _train("ppo", _ppo, config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def halva(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
          resume: Resume = False, overwrite: Overwrite = False):
    """HALVA: raise the correct phrase against the hallucinated one where a pair's answers differ, KL to the reference elsewhere.

    Example: tinyml halva -c tiny_halva -o runs/halva
    """
    _train("halva", _halva, config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def grpo(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
         resume: Resume = False, overwrite: Overwrite = False):
    """GRPO: G responses per prompt, rule / reward-model rewards, group-normalised advantages, clipped per-token loss + beta k3 KL.

    Example: tinyml grpo -c tiny_grpo -o runs/grpo --set grpo.num_generations=8
    """
    _train("grpo", _grpo("grpo"), config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def rloo(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
         resume: Resume = False, overwrite: Overwrite = False):
    """RLOO: G responses per prompt, leave-one-out baselines, KL-penalised rewards, clipped per-response loss (reads grpo.*).

    Example: tinyml rloo -c tiny_rloo -o runs/rloo --set grpo.beta=0.05
    """
    _train("rloo", _grpo("rloo"), config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@app.command()
def kto(config: Config = None, set_: TrainSets = None, output_dir: RunDir = None, json_mode: Json = False,
        resume: Resume = False, overwrite: Overwrite = False):
    """KTO on unpaired answers (prompt, completion, label; preference pairs are unpaired), frozen reference.

    Example: tinyml kto -c tiny_kto -o runs/kto --set pref.beta=0.1
    """
    _train("kto", _kto, config, set_, output_dir, json_mode, resume, overwrite, PREF_DEFAULTS)


@reward_app.command("score")
def reward_score(data: Path = typer.Argument(..., metavar="DATA", help="Preference JSONL (image, prompt, chosen, rejected)."),
                 model_dir: Path = typer.Option(..., "--model", "-m", metavar="DIR", help="A reward model folder (tinyml reward)."),
                 scores: Optional[Path] = typer.Option(None, "--scores", "--output", metavar="FILE", help="Write one JSON line of scores per pair here."),
                 config: Config = None, set_: DataSets = None, json_mode: Json = False):
    """Score the chosen and rejected answers of every pair; reports pairwise accuracy and mean margin.

    Example: tinyml reward score runs/prefs/pref_eval.jsonl --model runs/reward --json
    """
    from . import ui
    from .stages.reward import run_score
    ui.quiet_libraries()
    ui.emit(run_score(model_dir, data, _config(config, set_), scores), json_mode)


@app.command("eval")
def eval_(model_dir: Optional[Path] = typer.Argument(None, metavar="MODEL_DIR", show_default=False, help="A tinyml model folder (the output of a training command)."),
          data: Optional[str] = typer.Option(None, "--data", "-d", metavar="FILE", help="Held-out data (default: data.eval of the run's config.yaml, else of the recipe)."),
          config: Config = None, set_: GenSets = None,
          output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", metavar="DIR", help="Where predictions.jsonl and eval_metrics.json go."),
          json_mode: Json = False, onnx: Onnx = None):
    """Exact-match VQA accuracy (overall and per question type) and POPE metrics for a saved model.

    The run's own config.yaml gives the defaults: its data.eval, data.max_length, data.system_prompt and gen.*.

    Example: tinyml eval runs/sft --json
    """
    from . import ui
    from .stages.eval import run_defaults, run_eval
    cfg = _config(config, set_, run_defaults(onnx or model_dir))
    if data:
        cfg.data.eval = data
    if not onnx:  # the ONNX path never imports torch (nor transformers, which this would)
        ui.quiet_libraries()
    with ui.count_bar(ui.console(json_mode), "eval (onnx)" if onnx else "eval") as bar:
        result = run_eval(str(model_dir) if model_dir else None, cfg, output_dir, progress=bar, onnx=onnx,
                          status=bar.status)
    ui.emit(result, json_mode)


@app.command()
def generate(model_dir: Optional[Path] = typer.Argument(None, metavar="MODEL_DIR", show_default=False, help="A tinyml model folder."),
             prompt: str = typer.Option(..., "--prompt", "-p", metavar="TEXT", help="The question or instruction."),
             image: Optional[Path] = typer.Option(None, "--image", "-i", metavar="FILE", help="An image file."),
             config: Config = None, set_: GenSets = None, json_mode: Json = False,
             delta: Optional[List[Path]] = typer.Option(None, "--delta", metavar="DIR", help="A BitDelta folder to serve over MODEL_DIR as base (repeatable: one answer per delta)."),
             onnx: Onnx = None):
    """Answer a prompt about an image (greedy by default; --set gen.temperature=0.7 samples).

    Example: tinyml generate runs/sft --image runs/shapes/images/003000.png --prompt "What color is the circle?"
    """
    from . import ui
    from .stages.eval import run_defaults, run_generate
    if not onnx:
        ui.quiet_libraries()
    cfg = _config(config, set_, run_defaults(onnx or (None if delta else model_dir)))
    result = run_generate(model_dir, str(image) if image else None, prompt, cfg, onnx=onnx, deltas=delta)
    if json_mode:
        ui.emit(result, True)
    else:
        answers = result.get("answers", [])
        typer.echo("\n".join(f"{a['delta']}: {a['answer']}" for a in answers) if len(answers) > 1 else result["answer"])


@app.command()
def chat(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A tinyml model folder, or an ONNX export (runs without torch)."),
         image: Optional[Path] = typer.Option(None, "--image", "-i", metavar="FILE", help="An image for the first message."),
         config: Config = None, set_: GenSets = None):
    """Talk with a model in the terminal, its answers streamed as they are decoded.

    Commands in the conversation: /image PATH attaches an image to your next message, /reset starts again,
    /exit (or Ctrl-D) ends. Multi-turn: earlier turns and images stay in the context.

    Example: tinyml chat runs/sft --image runs/shapes/images/003000.png
    """
    from . import ui
    from .stages.chat import Chatbot, ChatSession, model_kind
    from .stages.eval import run_defaults
    cfg = _config(config, set_, run_defaults(model_dir))
    if model_kind(model_dir) == "torch":
        ui.quiet_libraries()
    con = ui.console(True)  # notes on stderr: stdout holds the conversation alone
    with con.status(f"loading {model_dir}..."):
        session = ChatSession(Chatbot(model_dir, cfg), cfg.gen)
    if image:
        session.attach(str(image))
    ui.chat(session, con)


@app.command()
def serve(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A tinyml model folder, or an ONNX export (runs without torch)."),
          port: int = typer.Option(8000, "--port", help="TCP port."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; there is no authentication)."),
          model_name: Optional[str] = typer.Option(None, "--model-name", metavar="NAME", help="The model id clients send (default: the folder's name)."),
          image_root: Path = typer.Option(Path("."), "--image-root", metavar="DIR", help="Image parts given as file paths must lie under this folder (data URLs always work)."),
          max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting or running at once; more get HTTP 503."),
          max_image_mb: float = typer.Option(16, "--max-image-mb", help="Largest image a request may carry, in MB."),
          config: Config = None, set_: GenSets = None,
          log_requests: bool = typer.Option(False, "--log-requests", help="Log every request (uvicorn's access log).")):
    """An OpenAI-compatible HTTP server: /v1/chat/completions (images, streaming) and /v1/models.

    Needs the serve extra: pip install 'tinyml-cli\\[serve]'. One request runs at a time; the others wait their turn.

    Example: tinyml serve runs/sft --port 8000
    """
    from . import ui
    from .stages.chat import model_kind
    from .stages.eval import run_defaults
    from .stages.serve import Limits, bind, load_server, run_server
    cfg = _config(config, set_, run_defaults(model_dir))
    if model_kind(model_dir) == "torch":
        ui.quiet_libraries()
    sock = bind(host, port)
    con = ui.console(True)
    limits = Limits(max_queue=max_queue, max_image_bytes=int(max_image_mb * (1 << 20)))
    with con.status(f"loading {model_dir}..."):
        app_, model_id, kind = load_server(model_dir, cfg, model_name, image_root, limits)
    ui.serving(con, model_id, kind, host, sock.getsockname()[1])
    run_server(app_, sock, "info" if log_requests else "warning")


@app.command()
def env(json_mode: Json = False):
    """Versions of Python, torch, transformers, peft, bitsandbytes, accelerate, onnxruntime, and this machine's
    accelerators and memory (paste it into a bug report).

    Example: tinyml env --json
    """
    from . import ui
    from .stages.env import run_env
    result = run_env()
    ui.emit(result, True) if json_mode else ui.env_report(ui.console(False), result)


@app.command()
def merge(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder trained with lora, dora, ia3, qlora or bitfit."),
          output_arg: _out_arg("Where the merged model folder goes") = None, output_dir: OutDir = None,
          overwrite: Overwrite = False, json_mode: Json = False):
    """Fold a run's adapters into full weights (QLoRA: into its dequantized base) as a plain model folder.

    Example: tinyml merge runs/sft runs/sft-merged
    """
    from . import ui
    from .stages.merge import merge_run
    from .stages.outputs import removed_if_left_empty
    out = _output(output_arg, output_dir)
    ui.quiet_libraries()
    with removed_if_left_empty(out):
        ui.emit(merge_run(run_dir, out, overwrite), json_mode)


@app.command("build-tiny")
def build_tiny(output_arg: _out_arg("Where llm/ and vision/ are saved (default runs/tiny)") = None, output_dir: OutDir = None,
               seed: int = typer.Option(1234, help="Seed of the pretraining data and weights."),
               llm_steps: int = typer.Option(200, help="Language-model pretraining steps of the LLM."),
               vision_steps: int = typer.Option(200, help="Contrastive pretraining steps of the vision tower."),
               scenes: int = typer.Option(4000, help="Synthetic scenes in the pretraining corpus."),
               json_mode: Json = False):
    """Build the tiny default offline: a tokenizer, a Llama LLM and a SigLIP tower, briefly pretrained.

    Example: tinyml build-tiny runs/tiny
    """
    from . import ui
    from .demo.tiny import build_tiny as build
    out = _output(output_arg, output_dir, Path("runs/tiny"))
    ui.quiet_libraries()
    with ui.console(json_mode).status("building the tiny default (tokenizer, LLM and vision pretraining)..."):
        figures = build(out, seed=seed, llm_steps=llm_steps, vision_steps=vision_steps, n_scenes=scenes)
    ui.emit({"command": "build-tiny", "output_dir": str(out), "metrics": figures,
             "artifacts": {"llm": figures.pop("llm"), "vision": figures.pop("vision")}}, json_mode)


@data_app.command("synth-shapes")
def synth_shapes(output_arg: _out_arg("Folder for images/, captions.jsonl, train.jsonl, eval.jsonl") = None, output_dir: OutDir = None,
                 n: int = typer.Option(8000, "--n", help="Training images."),
                 n_eval: int = typer.Option(200, "--n-eval", help="Held-out images (5 questions each)."),
                 seed: int = typer.Option(0, help="Random seed."), json_mode: Json = False):
    """Synthetic shapes: captions (alignment), multi-turn VQA (sft) and a held-out split with POPE questions.

    Example: tinyml data synth-shapes runs/shapes --n 8000
    """
    from . import ui
    from .demo.synth import synth_shapes_command
    ui.emit(synth_shapes_command(_output(output_arg, output_dir), n, n_eval, seed), json_mode)


@data_app.command("synth-preferences")
def synth_preferences(output_arg: _out_arg("Folder for images/, pref_train.jsonl, pref_eval.jsonl, pope_probe.jsonl") = None,
                      output_dir: OutDir = None,
                      n: int = typer.Option(24000, "--n", help="Training pairs (one scene each)."),
                      n_eval: int = typer.Option(1000, "--n-eval", help="Held-out pairs."),
                      n_probe: int = typer.Option(1000, "--n-probe", help="Held-out POPE probe questions (three-object scenes)."),
                      seed: int = typer.Option(1, help="Random seed (differs from synth-shapes' default)."),
                      json_mode: Json = False):
    """Hallucination preference pairs on new shapes scenes: the rejected answer swaps in a wrong colour, shape, count, side or an absent object.

    Example: tinyml data synth-preferences runs/prefs --n 24000
    """
    from . import ui
    from .demo.synth import synth_preferences_command
    ui.emit(synth_preferences_command(_output(output_arg, output_dir), n, n_eval, n_probe, seed), json_mode)


@data_app.command("validate")
def data_validate(file: Path = typer.Argument(..., metavar="DATA", help="A data set: JSON / JSONL, parquet file or folder, datasets folder or hub id."),
                  config: Config = None, set_: DataSets = None, json_mode: Json = False):
    """Report every problem of a data set at once, as training would; exit 2 if there is any.

    Conversations (sft, pretrain-align) or preference pairs (reward, dpo, ppo: records with chosen / rejected):
    records, fields, an assistant turn to learn from, images (fully decoded), placeholders, and an empty data set.
    With model.llm and model.vision (or model.init_from) set, token lengths and truncation are checked too.

    Example: tinyml data validate runs/shapes/train.jsonl -c tiny_sft
    """
    from . import ui
    from .stages.data import run_validate
    cfg = _config(config, set_)
    if cfg.model.init_from or cfg.model.llm:
        ui.quiet_libraries()
    result = run_validate(file, cfg)
    ui.problems(ui.console(json_mode), result["problems"])
    ui.emit(result, json_mode)
    if result["problems"]:
        raise typer.Exit(2)


@app.command()
def demo(output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", "-o", metavar="DIR", help="Folder for everything the demo makes."),
         quick: bool = typer.Option(False, "--quick", help="Smoke test: a few steps of every stage (accuracy is meaningless)."),
         full: bool = typer.Option(False, "--full", help="Add the later stages after sft: reward -> dpo -> mdpo -> ppo -> grpo on hallucination pairs, then export and BitDelta."),
         seed: int = typer.Option(0, "--seed", help="Seed of the tiny default's pretraining, the synthetic data and every training run."),
         json_mode: Json = False):
    """The whole pipeline on CPU in minutes: tiny default -> data -> pretrain-align -> sft -> eval (--full: -> reward -> dpo -> mdpo -> ppo -> grpo -> edge).

    Example: tinyml demo --json --seed 1
    """
    from . import ui
    from .demo.pipeline import run_demo
    ui.quiet_libraries()
    ui.emit(run_demo(output_dir, ui.console(json_mode), quick=quick, full=full, seed=seed), json_mode)


@bitdelta_app.command("compress")
def bitdelta_compress(base: Path = typer.Argument(..., metavar="BASE", help="The base tinyml model folder (e.g. the pretrain-align run)."),
                      finetuned: Path = typer.Argument(..., metavar="FINETUNED", help="The fine-tuned tinyml model folder (e.g. the sft run)."),
                      output_arg: _out_arg("Where the delta folder goes") = None, output_dir: OutDir = None,
                      config: Config = None, set_: TrainSets = None, json_mode: Json = False,
                      resume: Resume = False, overwrite: Overwrite = False):
    """Sign bits + one scale per linear weight of FINETUNED - BASE, scales distilled on data.train (train.* keys).

    Calibration and held-out data default to the fine-tuned run's data.train / data.eval.

    Example: tinyml bitdelta compress runs/align runs/sft runs/sft-delta --json
    """
    from .stages.bitdelta import compress_config, run_compress
    from .stages.checks import check_model_dir, check_run, run_inputs
    from .stages.outputs import prepare_output, removed_if_left_empty
    out = _output(output_arg, output_dir)
    cfg = compress_config(config, set_, finetuned)
    check_model_dir(base, "BASE: ")
    check_model_dir(finetuned, "FINETUNED: ")
    check_run(cfg, "bitdelta compress")
    prepare_output(out, resume, overwrite, inputs=[base, finetuned, *run_inputs(cfg)])
    from . import ui
    ui.quiet_libraries()
    with removed_if_left_empty(out), ui.training_bar(ui.console(json_mode), "scale distillation") as bar:
        result = run_compress(cfg, base, finetuned, out, resume=resume, progress=bar, status=bar.status)
    ui.emit(result, json_mode)


@bitdelta_app.command("apply")
def bitdelta_apply(base: Path = typer.Argument(..., metavar="BASE", help="The base tinyml model folder the delta was made from."),
                   delta: Path = typer.Argument(..., metavar="DELTA", help="A delta folder (from bitdelta compress)."),
                   output_arg: _out_arg("Where the merged tinyml model folder goes") = None, output_dir: OutDir = None,
                   json_mode: Json = False, overwrite: Overwrite = False):
    """BASE + DELTA as an ordinary tinyml model folder.

    Example: tinyml bitdelta apply runs/align runs/sft-delta runs/sft-bitdelta
    """
    from . import ui
    from .stages.bitdelta import run_apply
    from .stages.checks import check_model_dir
    from .stages.outputs import prepare_output, removed_if_left_empty
    out = _output(output_arg, output_dir)
    if not (delta / "bitdelta.json").is_file():
        raise UserError(f"not a BitDelta folder (no bitdelta.json): {delta}")
    check_model_dir(base, "BASE: ")
    prepare_output(out, overwrite=overwrite, marker="tinyml_model.json", holds="a model", inputs=[base, delta])
    ui.quiet_libraries()
    with removed_if_left_empty(out):
        ui.emit(run_apply(base, delta, out), json_mode)


@app.command()
def export(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A trained tinyml model folder (LoRA adapters are merged first)."),
           output_arg: _out_arg("Folder for the export") = None, output_dir: OutDir = None,
           format: str = typer.Option("onnx", "--format", "-f", help="onnx (for onnxruntime) | gguf (llama.cpp: LLM + mmproj) | hf-llava (transformers LlavaForConditionalGeneration)."),
           dtype: str = typer.Option("fp32", "--dtype", help="ONNX weights and activations: fp32 | fp16."),
           gguf_type: str = typer.Option("f16", "--gguf-type", help="GGUF LLM weights: f32 | f16 | q8_0 | q4_0 (the mmproj: f32 at f32, else f16)."),
           overwrite: Overwrite = False, json_mode: Json = False):
    """Export a trained model: ONNX graphs (vision+connector, embeddings, KV-cache decoder: written by
    onnxruntime-genai's model builder, fused, where it takes the LLM), GGUF for llama.cpp (model.gguf + mmproj.gguf)
    or a LLaVA checkpoint.

    A folder that already holds files is refused without --overwrite.

    Example: tinyml export runs/sft runs/onnx --format onnx
    """
    from . import ui
    from .stages.export import run_export
    out = _output(output_arg, output_dir)
    ui.emit(run_export(model_dir, out, format, dtype, overwrite, before_work=ui.quiet_libraries, gguf_type=gguf_type),
            json_mode)


@app.command()
def quantize(source: Path = typer.Argument(..., metavar="SOURCE", help="An ONNX export (int4) or a tinyml model folder (nf4 / fp4 / int8)."),
             output_arg: _out_arg("Folder for the quantized copy") = None, output_dir: OutDir = None,
             method: str = typer.Option("int4", "--method", help="int4 (ONNX MatMulNBits) | nf4 | fp4 | int8 (bitsandbytes)."),
             block_size: int = typer.Option(32, "--block-size", help="int4: input channels per quantization block."),
             symmetric: bool = typer.Option(False, "--symmetric", help="int4: symmetric blocks (no zero points)."),
             accuracy_level: int = typer.Option(4, "--accuracy-level", help="int4: MatMulNBits compute, 4 int8 activations (faster on CPU) | 0 fp32."),
             algorithm: str = typer.Option("rtn", "--algorithm", help="int4: rtn (round to nearest; with the 8-bit projections it kept the most on real weights) | kquant | hqq."),
             eight_bit: Optional[str] = typer.Option(None, "--eight-bit", metavar="PROJ,...", help="int4: decoder projections kept at 8 bits, from lm_head, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; none for 4 bits throughout. Default: lm_head,q_proj,k_proj,v_proj,down_proj."),
             data: Optional[str] = typer.Option(None, "--data", "-d", metavar="FILE", help="Held-out data: evaluate before and after."),
             config: Config = None, set_: GenSets = None, overwrite: Overwrite = False, json_mode: Json = False):
    """Quantize a model and report file sizes and, with --data, the eval change against the unquantized model.

    A folder that already holds files is refused without --overwrite.

    Example: tinyml quantize runs/onnx runs/onnx-int4 --block-size 32 --data runs/shapes/eval.jsonl
    """
    from . import ui
    from .stages.quantize import run_quantize
    out = _output(output_arg, output_dir)
    cfg = _config(config, set_)
    before = ui.quiet_libraries if method != "int4" else None  # the int4 path stays torch-free
    ui.emit(run_quantize(source, out, method, block_size, symmetric, data, cfg, accuracy_level, overwrite, before,
                         algorithm, eight_bit),
            json_mode)


@app.command()
def estimate(config: Config = None, set_: PlanSets = None, json_mode: Json = False,
             device: str = typer.Option("auto", "--device", help="cuda (a bf16 GPU) | cpu | auto (this machine's): what the estimate is for and where --measure runs."),
             gpu: float = typer.Option(24, "--gpu", help="A card size in GiB the advice plans for too (besides 8, 12, 16, 24; --infer: the one it aims at)."),
             image_size: int = typer.Option(0, "--image-size", help="Image resolution (0: the vision config's)."),
             infer: bool = typer.Option(False, "--infer", help="Estimate inference with a KV cache instead of training."),
             context: int = typer.Option(2048, "--context", help="--infer: tokens per sequence in the KV cache."),
             kv_bytes: int = typer.Option(2, "--kv-bytes", help="--infer: bytes per KV cache element (2 bf16, 1 fp8)."),
             measure: bool = typer.Option(False, "--measure", help="Also run two real training steps here and report the measured peak.")):
    """VRAM planner: memory of a training step (or inference) by component, which cards it fits, how to make it fit.

    Example: tinyml estimate --set model.llm=examples/configs/tinyllama-1.1b --set model.vision=examples/configs/siglip-so400m-patch14-384 --set peft.method=lora
    """
    from . import ui
    from .stages.estimate import run_estimate
    ui.quiet_libraries()
    cfg = _config(config, set_, {"train.parts": ["connector", "llm"]})  # sft's defaults
    result = run_estimate(cfg, device, gpu, measure, infer, context, kv_bytes, image_size)
    ui.emit(result, True) if json_mode else ui.estimate_report(ui.console(False), result)


@app.command()
def report(run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR", help="Run folders (metrics.jsonl, eval_metrics.json, estimate.json), or folders of runs."),
           output_dir: Path = typer.Option(Path("runs/report"), "--output-dir", "-o", metavar="DIR", help="Where report.html and the PNG figures go."),
           json_mode: Json = False):
    """Figures (loss, lr, objective metrics, eval, memory) and a self-contained report.html from runs.

    Example: tinyml report runs/demo/align runs/demo/sft -o runs/report
    """
    from . import ui
    from .stages.report import make_report
    result = make_report(run_dirs, output_dir)
    ui.console(json_mode).print(ui.runs_table(result["runs"]))
    ui.emit(result, json_mode)


@recipes_app.command("list")
def recipes_list(json_mode: Json = False):
    """Each shipped recipe with the command line it opens with.

    Example: tinyml recipes list
    """
    from . import ui
    from .config import shipped_recipes
    found = shipped_recipes()
    if json_mode:
        ui.emit({"command": "recipes list", "output_dir": None, "metrics": {"recipes": len(found)},
                 "artifacts": {}, "recipes": found}, True)
    else:
        ui.console(False).print(ui.recipes_table(found))


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., metavar="NAME", help="A shipped recipe's name (see `tinyml recipes list`).")):
    """Print a shipped recipe, to copy and edit.

    Example: tinyml recipes show tiny_sft > my_sft.yaml
    """
    from .config import recipe_text
    typer.echo(recipe_text(name), nl=False)


@recipes_app.command("keys")
def recipes_keys(json_mode: Json = False):
    """Every recipe key with its default and what it means (valid values of a choice in brackets).

    Example: tinyml recipes keys | grep train.
    """
    from . import ui
    from .config import RunConfig, all_keys, choices
    defaults = RunConfig().to_dict()
    rows = [(k, defaults[k.split(".")[0]][k.split(".", 1)[1]], h) for k, h in all_keys().items()]
    if json_mode:
        ui.emit({"command": "recipes keys", "output_dir": None, "metrics": {"keys": len(rows)}, "artifacts": {},
                 "keys": {k: {"default": d, "help": h, **({"choices": list(choices(k))} if choices(k) else {})}
                          for k, d, h in rows}}, True)
        return
    for k, d, h in rows:
        typer.echo(f"{k:32} {str(d):14} {h}")


def version_callback(value: bool):
    if value:
        typer.echo(f"tinyml {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Show the version and exit.")):
    """tinyml: post-train small multimodal LLMs and ship them to 8-24 GB GPUs and CPUs."""


def _help_types() -> None:
    """typer's rich help prints a type after every parameter: after flags too (`--json <bool>`, which reads as if
    the flag took a value) and lists as `<list[Path]>`. Here a flag shows none and a list its item (`<path>...`)."""
    import re

    from typer.core import TyperArgument, TyperOption
    for cls in (TyperOption, TyperArgument):
        shown = getattr(cls, "display_type_rich", None)
        if shown is None or getattr(shown, "tinyml", False):
            continue

        def display_type_rich(self, ctx, shown=shown):
            if getattr(self, "is_flag", False):
                return None
            text = shown(self, ctx)
            return re.sub(r"<list\[(\w+)\]>", lambda m: f"<{m.group(1).lower()}>...", text) if text else text
        display_type_rich.tinyml = True
        cls.display_type_rich = display_type_rich


def main() -> None:
    import logging
    _help_types()
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
