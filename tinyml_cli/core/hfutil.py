"""What both kinds of model (composed `model.LMM`, published `hf_vlm.HFVLM`) share: loading with one-line errors,
the tokenizer's set-up, the labelled-token loss, saving a peft-wrapped model's base, and the linear layers LoRA
may adapt."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import IMAGE_TOKEN, UserError

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _hf_load(fn, ident: str, what: str, **kw):
    """from_pretrained with a one-line user error for a missing folder or an id that can't be reached.

    Weights load only from safetensors (`use_safetensors=True` where passed): a pickled checkpoint can run
    code when it is unpickled, so one from a stranger is refused rather than trusted.
    """
    from ..config import model_source_problem
    problem = model_source_problem(ident)
    if problem:  # said here: the hub's own message for a path ("Repo id must be in the form ...") misleads
        raise UserError(f"cannot load {what} '{ident}': {problem}")
    try:
        return fn(ident, **kw)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} '{ident}': {msg}") from None


def prepare_tokenizer(tok, llm) -> None:
    """Make sure the tokenizer has an image token, a pad token and a chat template; grow embeddings if needed."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if llm is not None and len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok))


def compiled_chat_template(tok):
    """The tokenizer's chat template as a function (messages, add_generation_prompt) -> text, or None.

    `apply_chat_template` spends more time normalising the messages and its arguments than rendering them: calling
    transformers' compiled template (a private function) directly encodes a shapes record in 1.26 ms instead of
    1.77 (the data-scale benchmark's tokenizer), and a 665k set's cold first step took 403 s instead of 622 s on 2
    cores. The Encoder uses it only once it renders the data's first conversation as apply_chat_template does."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data
        template = _compile_jinja_template(tok.get_chat_template())
        specials = _plain_template_data(dict(tok.special_tokens_map))
    except Exception:  # another transformers, or no template: apply_chat_template says what is wrong
        return None

    def render(messages, add_generation_prompt):
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **specials)
    return render


def labelled_loss(logits_at, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (both kinds of model).

    Only assistant tokens carry labels: projecting just those rows onto the vocabulary saves most of the logits
    memory and compute, and chunking bounds it for large vocabularies."""
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != -100
    if not keep.any():
        raise ValueError("no labelled token in the batch")
    h, y = h[keep], y[keep]
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y.shape[0], 2048):
        logits = logits_at(h[i:i + 2048]).float()
        total = total + F.cross_entropy(logits, y[i:i + 2048], reduction="sum")
    return total / y.shape[0]


@contextlib.contextmanager
def adapters_lifted(module):
    """The base model of a peft model with its original layers back in place, until the block ends (any other
    module: itself).

    peft wraps each adapted layer (`q_proj` -> `q_proj.base_layer` + `lora_A`...); saved as is, the base's own
    weights would be missing under their real names and re-initialised on load. Swapping the modules (rather
    than passing a cleaned state dict, which the bitsandbytes quantizer ignores) works for 4-bit bases too.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    if not hasattr(module, "get_base_model"):
        yield module
        return
    base = module.get_base_model()
    swapped = []
    for name, mod in list(base.named_modules()):
        # LoRA-style layers keep the original as `base_layer`; LLaMA-Adapter's AdaptedAttention as `model`
        original = mod.base_layer if isinstance(mod, BaseTunerLayer) and hasattr(mod, "base_layer") else \
            mod.model if type(mod).__name__ == "AdaptedAttention" else None
        if original is not None:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, original)
            swapped.append((parent, child, mod))
    try:
        yield base
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)


def linear_names(module) -> list[str]:
    """Every nn.Linear of a vision tower or connector, except the projections of nn.MultiheadAttention (the
    resampler's, Q-Former's and SigLIP head's attention): its forward reads their weights directly, so a LoRA
    wrapped around them would never run."""
    from torch import nn
    inside = {f"{n}.{c}" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)
              for c, _ in m.named_children()}
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in inside]


def dequantized(model, auto_cls):
    """A plain fp32 copy of a 4-bit HF model (QLoRA's base). transformers' dequantized model keeps its loading-time
    bitsandbytes conversions and cannot save itself, so its weights go into a fresh model built from the config."""
    import copy
    weights = model.dequantize(dtype=torch.float32).state_dict()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto_cls.from_config(config, dtype=torch.float32)
    plain.load_state_dict(weights)
    plain.generation_config = model.generation_config
    return plain


def gguf_folder(path: str) -> str:
    """A `.gguf` causal LM as an ordinary HF folder, dequantized once and cached under TINYML_CACHE
    (~/.cache/tinyml). transformers dequantizes GGUF weights with the `gguf` package, but refuses to
    `save_pretrained` a model loaded that way: the weights go into a model rebuilt from its config."""
    import os
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise UserError(f"GGUF file not found: {path}")
    st = p.stat()
    cache = Path(os.environ.get("TINYML_CACHE", Path.home() / ".cache" / "tinyml")) / "gguf"
    out = cache / f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (out / "config.json").is_file():
        return str(out)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading GGUF needs the gguf package (pip install -e '.[real]')") from None
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": p.name}
    tok = _hf_load(AutoTokenizer.from_pretrained, str(p.parent), "GGUF tokenizer", **kw)
    llm = _hf_load(AutoModelForCausalLM.from_pretrained, str(p.parent), "GGUF LLM", dtype=torch.float32, **kw)
    config = copy.deepcopy(llm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(llm.state_dict())
    plain.generation_config = llm.generation_config
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def llm_source(ident: str) -> str:
    """`model.llm` as something from_pretrained takes: a hub id, a folder, or a .gguf file's dequantized folder."""
    return gguf_folder(ident) if str(ident).lower().endswith(".gguf") else ident


def wrap_parts(model, configs: dict) -> None:
    """Wrap each named part of a composed model in a peft model ({part: peft config}); a target that matches
    nothing in it is a user error."""
    from peft import get_peft_model
    for part, config in configs.items():
        try:
            setattr(model, part, get_peft_model(getattr(model, part), config))
        except ValueError as e:
            raise UserError(f"peft.method={config.peft_type.value.lower()} on the {part}: "
                            f"{str(e).splitlines()[0]} (see peft.target_modules)") from None
