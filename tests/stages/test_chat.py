"""chat: streamed text that adds up to the plain answer, the conversation's commands, and the same replies from a
model folder (PyTorch), its ONNX export (no torch) and `tinyml generate`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyml_cli import IMAGE_TOKEN, UserError
from tinyml_cli.config import load_config
from tinyml_cli.stages.chat import ChatSession, TextStream


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), 256 = end of sequence: decoding a prefix can end inside a character."""
    eos_token_id = 256

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["  héllo wörld \n", "red", "日本語 ok", "", "a  b"])
def test_stream_pieces_add_up_to_the_stripped_answer_with_whole_characters(text):
    pieces = []
    stream = TextStream(ByteTokenizer(), pieces.append)
    for b in text.encode():
        stream.add(b)
    stream.add(256)
    final = stream.finish()
    assert final == text.strip() and "".join(pieces) == final
    assert all("\ufffd" not in p and p for p in pieces)


class EchoBot:
    """Encodes like the real bot (placeholders must match the images) and answers with what it was given."""
    folder, kind = Path("m"), "fake"

    def __init__(self, max_chars=200):
        self.max_chars, self.calls = max_chars, []

    def encode(self, messages, images):
        text = "".join(m["content"] for m in messages)
        if text.count(IMAGE_TOKEN) != len(images):
            raise UserError("placeholders")
        if len(text) > self.max_chars:
            raise UserError(f"prompt of {len(text)} tokens is longer than data.max_length={self.max_chars}")
        return list(range(len(text)))

    def reply(self, messages, images, gen, on_text=None, seed=0, prompt=None):
        from tinyml_cli.stages.chat import Reply
        self.calls.append(([dict(m) for m in messages], list(images)))
        text = f"{len(messages)} messages, {len(images)} images"
        if on_text:
            on_text(text)
        return Reply(text, len(prompt), 3, "stop", 0.0)


def test_session_keeps_the_conversation_and_its_images(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    bot = EchoBot()
    s = ChatSession(bot, gen=None)
    assert s.ask("hi").text == "1 messages, 0 images"
    assert s.command(f"/image {tmp_path / 'a.png'}").startswith("attached")
    assert s.ask("what color?").text == "3 messages, 1 images"
    messages, images = bot.calls[-1]
    assert messages[-1] == {"role": "user", "content": f"{IMAGE_TOKEN}\nwhat color?"} and images == [tmp_path / "a.png"]
    assert s.ask("and now?").text == "5 messages, 1 images"  # earlier images stay in the context
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3
    with pytest.raises(UserError, match="image not found"):
        s.command(f"/image {tmp_path / 'nope.png'}")
    with pytest.raises(UserError, match="unknown command /imag"):
        s.command("/imag x")
    with pytest.raises(UserError, match="/image takes a path"):
        s.command("/image")
    assert s.command("/reset") == "conversation cleared" and s.messages == [] and s.images == []
    assert s.command("/exit") is None and s.command("/quit") is None


def test_a_conversation_that_no_longer_fits_says_so_and_stays_as_it_was():
    s = ChatSession(EchoBot(max_chars=40), gen=None)
    s.ask("short")
    before = list(s.messages)
    with pytest.raises(UserError, match=r"longer than data.max_length=40 \(/reset starts a new conversation\)"):
        s.ask("a question far too long to fit in forty characters")
    assert s.messages == before


@pytest.fixture(scope="module")
def gen_cfg():
    return load_config(None, ["gen.max_new_tokens=5"])


def test_torch_and_onnx_bots_stream_the_answers_generate_gives(trained, exported, shapes, gen_cfg):
    """Greedy, multi-turn with images: the streamed pieces add up to the reply; the model folder's reply is the
    batch path's (`answers_for`, what `generate` / `eval` use) and the ONNX export's is the same."""
    from tinyml_cli.core.generation import answers_for
    from tinyml_cli.records.conversations import Example
    from tinyml_cli.records.encoder import encoder_for
    from tinyml_cli.stages.chat import Chatbot
    torch_bot, onnx_bot = Chatbot(trained, gen_cfg), Chatbot(exported, gen_cfg)
    assert (torch_bot.kind, onnx_bot.kind) == ("torch", "onnx")
    img = [shapes / "images" / f"{i:06d}.png" for i in (48, 49)]
    turns = [([{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat color is the shape?"}], img[:1]),
             ([{"role": "user", "content": "How many shapes?"}], [])]
    history, images = [], []
    for msgs, imgs in turns:
        history, images = history + msgs, images + imgs
        pieces = []
        got = torch_bot.reply(history, images, gen_cfg.gen, pieces.append)
        prompt = encoder_for(torch_bot.model, gen_cfg.data).encode(history, len(images), for_generation=True)[0]
        ref = answers_for(torch_bot.model, [Example(prompt, [-100] * len(prompt), images)], gen_cfg.gen)[0]
        assert got.text == ref and "".join(pieces) == ref and got.prompt_tokens == len(prompt)
        assert got.completion_tokens == 5 and got.finish_reason == "length"  # the trained fixture never stops early
        assert got.text  # a real answer, not an empty string
        onnx_pieces = []
        assert onnx_bot.reply(history, images, gen_cfg.gen, onnx_pieces.append).text == ref == "".join(onnx_pieces)
        history = history + [{"role": "assistant", "content": got.text}]


def _chat(model_dir, stdin, *args, code_prefix=""):
    code = (f"import sys\nsys.argv = ['tinyml', 'chat', {str(model_dir)!r}, *{list(map(str, args))!r}]\n"
            "from tinyml_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "sys.exit(rc + (10 if 'torch' in sys.modules else 0))")
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def expected_answers(bot, gen, image, lines):
    s = ChatSession(bot, gen)
    s.attach(str(image))
    out = []
    for line in lines:
        if line.startswith("/"):
            s.command(line)
        else:
            out.append(s.ask(line).text)
    return out


def test_chat_command_on_an_onnx_export_needs_no_torch(exported, shapes, gen_cfg):
    """`tinyml chat ONNX_DIR` with piped input: multi-turn, /image, /reset; torch is never imported; the answers are
    those of a session in this process."""
    from tinyml_cli.stages.chat import Chatbot
    img, img2 = shapes / "images" / "000048.png", shapes / "images" / "000049.png"
    lines = ["What color is the shape?", f"/image {img2}", "And this one?", "/reset", "Hello", "/exit", "never"]
    r = _chat(exported, "\n".join(lines) + "\n", "--image", img, "--set", "gen.max_new_tokens=5")
    assert r.returncode == 0, r.stderr[-2000:]
    want = expected_answers(Chatbot(exported, gen_cfg), gen_cfg.gen, img, lines[:-2])
    assert r.stdout.splitlines() == want and len(want) == 3 and all(want)
    assert "attached" in r.stderr and "conversation cleared" in r.stderr


@pytest.mark.slow
def test_chat_command_on_a_model_folder(trained, shapes, gen_cfg):
    from tinyml_cli.stages.chat import Chatbot
    img = shapes / "images" / "000050.png"
    lines = ["What shape is it?", "/image nope.png", "Is it red?"]
    r = _chat(trained, "\n".join(lines) + "\n", "--image", img, "--set", "gen.max_new_tokens=5")
    assert r.returncode == 10, r.stderr[-2000:]  # exit 0, and torch was loaded (a model folder runs on PyTorch)
    assert "error: image not found: nope.png" in r.stderr
    want = expected_answers(Chatbot(trained, gen_cfg), gen_cfg.gen, img, [lines[0], lines[2]])
    assert r.stdout.splitlines() == want and all(want)
