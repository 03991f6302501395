"""Tiny random-weight instances of published VLM families, with their processors assembled offline.

Each family gets what a hub download would hold, at toy size: a small config of the family's own model class
(`LlavaForConditionalGeneration`, `SmolVLMForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`...),
a tokenizer (a byte-level BPE trained here) carrying the family's special tokens, the family's image processor
and processor, and a chat template of the family's shape. `build_tiny_vlm(family, out)` saves them with
`save_pretrained`, so tests and benchmarks load them back through the real `from_pretrained` path
(`model.vlm: OUT`). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llava", "smolvlm", "idefics3", "qwen2_5_vl", "qwen3_vl", "lfm2_vl", "gemma3", "internvl", "paligemma")

# Chat templates of each family's shape (role markers, where images go, end-of-turn token), reduced to what a
# conversation of text and image parts needs.
_PARTS = ("{% for p in m['content'] %}{% if p['type'] == 'image' %}IMG{% else %}{{ p['text'] }}{% endif %}"
          "{% endfor %}")


def _template(turn: str, gen: str, img: str) -> str:
    """A loop over messages rendering each as `turn` (with ROLE and CONTENT), then `gen` for the generation prompt."""
    content = _PARTS.replace("IMG", img.replace("\n", "{{ '\\n' }}"))
    # newlines as expressions: transformers renders templates with trim_blocks, which eats a newline after a tag
    body = turn.replace("\n", "{{ '\\n' }}").replace("ROLE", "{{ m['role'] }}").replace("CONTENT", content)
    gen = gen.replace("\n", "{{ '\\n' }}")
    return ("{{ bos_token }}{% for m in messages %}" + body + "{% endfor %}"
            "{% if add_generation_prompt %}" + gen + "{% endif %}")


CHATML = dict(turn="<|im_start|>ROLE\nCONTENT<|im_end|>\n", gen="<|im_start|>assistant\n")
TEMPLATES = {
    "llava": dict(turn="{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
                       "CONTENT{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}", gen="ASSISTANT:",
                  img="<image>\n"),
    "smolvlm": dict(turn="<|im_start|>{{ m['role'] | capitalize }}:CONTENT<end_of_utterance>\n", gen="<|im_start|>Assistant:",
                    img="<image>"),
    "qwen2_5_vl": dict(**CHATML, img="<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen3_vl": dict(**CHATML, img="<|vision_start|><|image_pad|><|vision_end|>"),
    "lfm2_vl": dict(**CHATML, img="<image>"),
    "gemma3": dict(turn="<start_of_turn>{% if m['role'] == 'assistant' %}model{% else %}{{ m['role'] }}{% endif %}\n"
                        "CONTENT<end_of_turn>\n", gen="<start_of_turn>model\n", img="<start_of_image>"),
    "internvl": dict(**CHATML, img="<IMG_CONTEXT>\n"),
}
TEMPLATES = {k: _template(**v) for k, v in TEMPLATES.items()}
TEMPLATES["idefics3"] = TEMPLATES["smolvlm"]
# PaliGemma is a prefix-LM that ships no chat template: its processor puts the images first, then bos, the prompt
# and a newline; the answer (the "suffix") follows and ends with eos. This template renders that layout.
TEMPLATES["paligemma"] = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{{ bos_token }}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}<eos>{% endif %}"
    "{% endfor %}")

# Tokens each family's tokenizer carries (beyond its chat markers), and the named ones its processor reads.
SPECIALS = {
    "llava": ["<image>"],
    "smolvlm": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
               + [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)],
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>"],
    "lfm2_vl": ["<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"]
               + [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "internvl": ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    "paligemma": ["<image>"],
}
SPECIALS["idefics3"] = SPECIALS["smolvlm"]
SPECIALS["qwen3_vl"] = SPECIALS["qwen2_5_vl"]
NAMED = {  # tokenizer attributes (transformers' extra_special_tokens) the family's processor reads
    "llava": {"image_token": "<image>"},
    "smolvlm": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    "qwen2_5_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    "lfm2_vl": {"image_token": "<image>"},
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "paligemma": {"image_token": "<image>"},
}
NAMED["idefics3"] = NAMED["smolvlm"]
NAMED["qwen3_vl"] = NAMED["qwen2_5_vl"]
EOS = {"llava": "</s>", "smolvlm": "<end_of_utterance>", "idefics3": "<end_of_utterance>", "gemma3": "<end_of_turn>",
       "paligemma": "<eos>"}  # the others end turns with <|im_end|>


def build_tokenizer(family: str, texts: list[str], vocab_size: int = 320):
    """A byte-level BPE over `texts` with the family's special tokens, named tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    eos = EOS.get(family, "<|im_end|>")
    base = ["<pad>", "<unk>", "<bos>", eos]
    specials = list(dict.fromkeys(base + SPECIALS[family]))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token=eos, pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:],
                                  extra_special_tokens=NAMED[family])
    tok.chat_template = TEMPLATES[family]
    return tok


def _corpus(n: int = 400) -> list[str]:
    import random

    from . import synth
    rng = random.Random(0)
    out = []
    for _ in range(n):
        objs = synth.random_scene(rng)
        out.append(synth.caption(objs))
        for k in synth.QUESTION_TYPES:
            q, a = synth.question(k, objs, rng)
            out.append(f"{q} {a}")
    return out


# --------------------------------------------------------------------------------------- the families
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def _ids(tok, family: str) -> dict:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "vocab_size": len(tok)}


def _build(family: str, tok):
    """(model, processor) of a family at toy size; images are 32x32 (the shapes data)."""
    import transformers as tf

    from ..core.hf_vlm import NoVideos, without_videos
    ids = _ids(tok, family)
    text = {**TEXT, **ids}
    size32 = {"height": 32, "width": 32}
    if family == "llava":
        proc = tf.LlavaProcessor(tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=size32), tok,
                                 patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg = tf.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **SIGLIP, projection_dim=32),
                             text_config=dict(model_type="llama", **text), image_token_id=proc.image_token_id,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=16, tie_word_embeddings=False)
        model = tf.LlavaForConditionalGeneration(cfg)
    elif family in ("smolvlm", "idefics3"):
        kind = "SmolVLM" if family == "smolvlm" else "Idefics3"
        image_proc = getattr(tf, f"{kind}ImageProcessorPil")(size={"longest_edge": 64},
                                                              max_image_size={"longest_edge": 32})
        extra = {"video_processor": NoVideos()} if family == "smolvlm" else {}
        proc = without_videos(getattr(tf, f"{kind}Processor"))(image_proc, tok, image_seq_len=4, **extra)
        cfg = getattr(tf, f"{kind}Config")(vision_config=dict(**SIGLIP), text_config=dict(model_type="llama", **text),
                                           scale_factor=2, image_token_id=proc.image_token_id,
                                           tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
        model = getattr(tf, f"{kind}ForConditionalGeneration")(cfg)
    elif family in ("qwen2_5_vl", "qwen3_vl"):
        image_proc = tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
        special = {k: tok.convert_tokens_to_ids(v) for k, v in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        if family == "qwen2_5_vl":
            proc = without_videos(tf.Qwen2_5_VLProcessor)(image_proc, tok, video_processor=NoVideos())
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                          out_hidden_size=64)
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
            cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=dict(**text, rope_parameters=rope),
                                      **special)
            model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
        else:
            proc = without_videos(tf.Qwen3VLProcessor)(image_proc, tok, video_processor=NoVideos())
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                          num_position_embeddings=64, deepstack_visual_indexes=[0])
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                    "rope_theta": 10000.0}
            cfg = tf.Qwen3VLConfig(vision_config=vision, text_config=dict(**text, rope_parameters=rope), **special)
            model = tf.Qwen3VLForConditionalGeneration(cfg)
    elif family == "gemma3":
        proc = tf.Gemma3Processor(tf.Gemma3ImageProcessorPil(size=size32), tok, image_seq_length=4)
        cfg = tf.Gemma3Config(vision_config=dict(**SIGLIP), text_config=dict(**text, sliding_window=64),
                              mm_tokens_per_image=4, image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"),
                              boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
                              eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"))
        model = tf.Gemma3ForConditionalGeneration(cfg)
    elif family == "internvl":
        image_proc = tf.GotOcr2ImageProcessorPil(size=size32, crop_to_patches=True, min_patches=1, max_patches=4)
        proc = without_videos(tf.InternVLProcessor)(image_proc, tok, video_processor=NoVideos(), image_seq_length=4)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=[32, 32], patch_size=[8, 8])
        cfg = tf.InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text),
                                downsample_ratio=0.5, image_token_id=proc.image_token_id)
        model = tf.InternVLForConditionalGeneration(cfg)
    elif family == "paligemma":
        image_proc = tf.SiglipImageProcessorPil(size=size32)
        image_proc.image_seq_length = 16
        proc = tf.PaliGemmaProcessor(image_proc, tok)
        ids = _ids(proc.tokenizer, family)  # the processor adds its location / segmentation tokens
        cfg = tf.PaliGemmaConfig(vision_config=dict(**SIGLIP, projection_dim=64),
                                 text_config=dict(model_type="gemma", **{**TEXT, **ids}),
                                 image_token_id=proc.image_token_id, projection_dim=64)
        model = tf.PaliGemmaForConditionalGeneration(cfg)
    elif family == "lfm2_vl":
        from ..core.hf_vlm import _lfm2_vl_image_processor
        image_proc = _lfm2_vl_image_processor()(encoder_patch_size=4, downsample_factor=2, tile_size=16,
                                             min_image_tokens=4, max_image_tokens=16, min_tiles=2, max_tiles=4,
                                             max_num_patches=64, do_image_splitting=True)
        proc = tf.Lfm2VlProcessor(image_proc, tok)
        text = {**text, "layer_types": ["conv", "full_attention"], "conv_L_cache": 3}
        cfg = tf.Lfm2VlConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, patch_size=4, num_patches=64),
                              text_config={k: v for k, v in text.items() if k != "head_dim"},
                              image_token_id=proc.image_token_id, downsample_factor=2, projector_hidden_size=32)
        model = tf.Lfm2VlForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown family {family!r} (families: {', '.join(FAMILIES)})")
    proc.chat_template = TEMPLATES[family]
    model.generation_config.eos_token_id = proc.tokenizer.eos_token_id
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    return model, proc


def build_tiny_vlm(family: str, out: str | Path, seed: int = 0) -> Path:
    """Save a random-weight `family` model and its processor under OUT (a folder `model.vlm` takes)."""
    import torch
    torch.manual_seed(seed)
    tok = build_tokenizer(family, _corpus())
    model, proc = _build(family, tok)
    out = Path(out)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out
