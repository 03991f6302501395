"""serve: the OpenAI-compatible server, through the official `openai` client and raw HTTP, on 127.0.0.1 only.

Each server runs in a thread of the test on a port the OS picks, and stops at the end of its block.
"""

import base64
import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tinyml_cli import IMAGE_TOKEN, UserError
from tinyml_cli.records.conversations import ImageBytes
from tinyml_cli.stages.serve import (
    Limits,
    RequestError,
    bind,
    create_app,
    parse_chat_request,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

GEN = SimpleNamespace(max_new_tokens=8, temperature=0.0, top_p=1.0)


@contextlib.contextmanager
def serving(app):
    """`app` on uvicorn in a thread, on 127.0.0.1 and a free port; yields the base URL; stops when the block ends."""
    import uvicorn
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def post(url, body, raw: bytes | None = None):
    """(status, JSON body) of a POST to /v1/chat/completions, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_bytes(size=(16, 16), color="red", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text, *urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


class FakeBot:
    """Answers with what it was asked (the last user text and the images' sizes), piece by piece, slowly, and
    records how many replies ran at once (the server must run one at a time)."""

    def __init__(self, delay=0.0):
        self.delay, self.running, self.most, self.lock = delay, 0, 0, threading.Lock()

    def encode(self, messages, images):
        text = "".join(m["content"] for m in messages)
        if text.count(IMAGE_TOKEN) != len(images):
            raise UserError("placeholders")
        if len(text) > 500:
            raise UserError(f"prompt of {len(text)} tokens is longer than data.max_length=500")
        return list(range(len(text)))

    def reply(self, messages, images, gen, on_text=None, seed=0, prompt=None):
        from tinyml_cli.stages.chat import Reply
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            sizes = [len(i.data) if isinstance(i, ImageBytes) else Path(i).stat().st_size for i in images]
            words = f"{messages[-1]['content'].split(chr(10))[-1]} | {sizes} | t={gen.temperature}".split(" ")
            words = words[:gen.max_new_tokens]
            for i, w in enumerate(words):
                time.sleep(self.delay)
                if on_text:
                    on_text(w if i == 0 else " " + w)
            return Reply(" ".join(words), len(prompt), len(words), "stop", 0.0)
        finally:
            with self.lock:
                self.running -= 1


# ------------------------------------------------------------------------------------- request validation
ROOT = Path(__file__).parent


@pytest.mark.parametrize("body, status, says", [
    ([1], 400, "must be a JSON object"),
    ({"messages": 5}, 400, "messages must be a non-empty list"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "a content part is"),
    ({"messages": [{"role": "user", "content": "hi <image>"}]}, 400, "is reserved"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "the last message must be a user message"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "user", "content": "hi"}]}, 400, "images go in user messages"),
    ({"messages": user("hi", "https://example.com/a.png")}, 400, "remote image URLs are not fetched"),
    ({"messages": user("hi", "data:image/png;base64,@@@")}, 400, "not valid base64"),
    ({"messages": user("hi", "data:image/png,abc")}, 400, "must be base64"),
    ({"messages": user("hi", "/etc/passwd")}, 400, "outside the server's image root"),
    ({"messages": user("hi", "../x.png")}, 400, "outside the server's image root"),
    ({"messages": user("hi", "missing.png")}, 400, "image not found"),
    ({"messages": user("hi", data_url(b"not a png"))}, 400, "bad image"),
    ({"messages": user("hi"), "model": "gpt-4o"}, 404, "model 'gpt-4o' does not exist"),
    ({"messages": user("hi"), "n": 2}, 400, "n must be 1"),
    ({"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens must be an integer in [1, 2048]"),
    ({"messages": user("hi"), "max_tokens": 10 ** 6}, 400, "max_tokens must be an integer"),
    ({"messages": user("hi"), "temperature": 3}, 400, "temperature must be a number in [0, 2]"),
    ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature must be a number"),
    ({"messages": user("hi"), "stop": ["\n"]}, 400, "stop sequences are not supported"),
    ({"messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools are not supported"),
    ({"messages": user("hi"), "stream": "yes"}, 400, "stream must be true or false"),
    ({"messages": user("hi"), "frequency_penalty": 1}, 400, "frequency_penalty is not supported"),
])
def test_bad_requests_are_refused_with_a_reason(body, status, says):
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, "m", GEN, ROOT, Limits())
    assert e.value.status == status and says in e.value.message, e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_good_requests_become_messages_images_and_settings(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                       *user("What color?", data_url(png_bytes()), "a.png", f"file://{tmp_path / 'a.png'}")],
            "max_completion_tokens": 4, "temperature": 0.5, "stream": True, "stream_options": {"include_usage": True},
            "seed": 7, "stop": None, "presence_penalty": 0}
    req = parse_chat_request(body, "m", GEN, tmp_path, Limits())
    assert req.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "\n".join([IMAGE_TOKEN] * 3 + ["What color?"])}]
    assert isinstance(req.images[0], ImageBytes) and req.images[1:] == [tmp_path / "a.png"] * 2
    assert (req.gen.max_new_tokens, req.gen.temperature, req.gen.top_p) == (4, 0.5, 1.0)
    assert req.stream and req.include_usage and req.seed == 7
    plain = parse_chat_request({"messages": [{"role": "user", "content": "hi"}]}, "m", GEN, tmp_path, Limits())
    assert plain.gen.max_new_tokens == 8 and not plain.stream  # the run's gen settings are the defaults


def test_oversized_and_decompression_bomb_images_are_refused():
    with pytest.raises(RequestError) as e:
        parse_chat_request({"messages": user("hi", data_url(png_bytes((400, 400), "white", "RGB") + b"\0" * 5000))},
                           "m", GEN, ROOT, Limits(max_image_bytes=4000))
    assert e.value.status == 413 and e.value.code == "image_too_large"
    bomb = png_bytes((9000, 8000), 0, "L")  # 72 M pixels in a few kB of PNG
    with pytest.raises(RequestError) as e:
        parse_chat_request({"messages": user("hi", data_url(bomb))}, "m", GEN, ROOT, Limits())
    assert e.value.status == 400 and "pixel limit" in e.value.message


# ------------------------------------------------------------------------------- the server, a fake model
def test_openai_client_against_the_server(tmp_path):
    bot = FakeBot()
    with serving(create_app(bot, "tiny", GEN, tmp_path, Limits(max_image_bytes=50_000))) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        img = png_bytes()
        msg = user("What color is it?", data_url(img))
        r = c.chat.completions.create(model="tiny", messages=msg, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == f"What color is it? | [{len(img)}] | t=0" and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
        chunks = list(c.chat.completions.create(model="tiny", messages=msg, max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
        assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) == 8  # piece by piece
        assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "stop"
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="tiny", messages=user("hi", data_url(png_bytes() + b"\0" * 60_000)))
        assert e.value.status_code == 413 and "over the 50,000-byte limit" in str(e.value)
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="gpt-4o", messages=user("hi"))


def test_raw_http_errors_are_json_and_the_server_goes_on():
    with serving(create_app(FakeBot(), "tiny", GEN, ".", Limits(max_body_bytes=10_000))) as url:
        assert post(url, {"messages": 5}) == (400, {"error": {"message": "messages must be a non-empty list of "
                                                                        "{role, content}", "type": "invalid_request_error",
                                                              "param": "messages", "code": None}})
        status, body = post(url, None, raw=b"{not json")
        assert status == 400 and "not valid JSON" in body["error"]["message"]
        status, body = post(url, None, raw=b"x" * 20_000)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, body = post(url, {"messages": [{"role": "user", "content": "x" * 600}]})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        for path, method, code in (("/v1/nope", "GET", 404), ("/v1/chat/completions", "GET", 405)):
            req = urllib.request.Request(url + path, method=method)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == code and "error" in json.loads(e.value.read())
        assert post(url, {"messages": [{"role": "user", "content": "still here"}]})[0] == 200
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"


def test_concurrent_requests_get_their_own_answers_one_at_a_time():
    """32 clients at once, half streaming: every answer is its own request's (never another's, never interleaved),
    and the model ran one request at a time."""
    bot = FakeBot(delay=0.002)
    with serving(create_app(bot, "tiny", GEN, ".")) as url:
        c = client(url)

        def ask(i):
            msg = [{"role": "user", "content": f"question-{i} alpha beta gamma delta"}]
            if i % 2:
                return "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(model="tiny", messages=msg, stream=True) if ch.choices)
            return c.chat.completions.create(model="tiny", messages=msg).choices[0].message.content
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
    assert answers == [" ".join(f"question-{i} alpha beta gamma delta | [] | t=0.0".split()[:8]) for i in range(32)]
    assert bot.most == 1


def test_a_full_queue_answers_503():
    bot = FakeBot(delay=0.2)
    with serving(create_app(bot, "tiny", GEN, ".", Limits(max_queue=1))) as url, ThreadPoolExecutor(3) as pool:
        codes = sorted(s for s, _ in pool.map(lambda i: post(url, {"messages": [{"role": "user", "content": "a b"}]}),
                                              range(3)))
    assert codes[0] == 200 and 503 in codes


# ------------------------------------------------------------------------------- the server, real models
def _ask_all(url, requests, stream=False):
    c = client(url)

    def one(msg):
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="m", messages=msg, max_tokens=5, temperature=0, stream=True)
                           if ch.choices)
        return c.chat.completions.create(model="m", messages=msg, max_tokens=5, temperature=0).choices[0].message.content
    return one


def _image_requests(shapes, n):
    qs = ["What color is the shape?", "How many shapes are there?", "Is there a circle?", "What shape is on the left?"]
    return [user(qs[i % len(qs)], data_url((shapes / "images" / f"{48 + i % 6:06d}.png").read_bytes())) for i in range(n)]


def test_a_model_folder_served_answers_as_chat_does(trained, shapes):
    """The official client on the PyTorch model, with an image: non-streamed and streamed answers are the
    Chatbot's own (what `tinyml chat` and `generate` say)."""
    from tinyml_cli.config import load_config
    from tinyml_cli.stages.chat import Chatbot
    from tinyml_cli.stages.serve import load_server
    cfg = load_config(None, ["gen.max_new_tokens=5"])
    app, model_id, kind = load_server(trained, cfg, "m")
    bot = Chatbot(trained, cfg)
    reqs = _image_requests(shapes, 2)
    img = [shapes / "images" / f"{48 + i:06d}.png" for i in range(2)]
    want = [bot.reply([{"role": "user", "content": f"{IMAGE_TOKEN}\n{r[0]['content'][1]['text']}"}], [im], cfg.gen).text
            for r, im in zip(reqs, img)]
    assert all(want) and (model_id, kind) == ("m", "torch")
    with serving(app) as url:
        assert [_ask_all(url, reqs)(r) for r in reqs] == want
        assert [_ask_all(url, reqs, stream=True)(r) for r in reqs] == want


@pytest.mark.slow
@pytest.mark.parametrize("which", ["torch", "onnx"])
def test_32_concurrent_requests_equal_the_one_at_a_time_answers(trained, exported, shapes, which):
    from tinyml_cli.config import load_config
    from tinyml_cli.stages.serve import load_server
    app, _, kind = load_server(trained if which == "torch" else exported, load_config(None, []), "m")
    assert kind == which
    reqs = _image_requests(shapes, 32)
    with serving(app) as url:
        one = _ask_all(url, reqs)
        streamed = _ask_all(url, reqs, stream=True)
        alone = [one(r) for r in reqs]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda i: (streamed if i % 2 else one)(reqs[i]), range(32)))
    assert together == alone and len(set(alone)) > 1 and all(alone)


@pytest.mark.slow
def test_tinyml_serve_command(trained, shapes):
    """`tinyml serve DIR --port N` as a user runs it: up, answers the client (with an image, streamed and not),
    refuses a malformed request, a port in use is one line, and SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "tinyml_cli", "serve", str(trained), "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        c = client(url)
        model = c.models.list().data[0].id
        assert model == trained.name
        msg = _image_requests(shapes, 1)[0]
        a = c.chat.completions.create(model=model, messages=msg, max_tokens=4, temperature=0).choices[0].message.content
        s = "".join(ch.choices[0].delta.content or "" for ch in
                    c.chat.completions.create(model=model, messages=msg, max_tokens=4, temperature=0, stream=True)
                    if ch.choices)
        assert a and a == s
        assert post(url, {"messages": 5})[0] == 400
        busy = subprocess.run([sys.executable, "-m", "tinyml_cli", "serve", str(trained), "--port", str(port)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert busy.returncode == 2 and busy.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal so that the exit status says what stopped it
    assert p.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert f"serving {trained.name} (torch) at http://127.0.0.1:{port}/v1" in " ".join(err.split())


def test_the_readme_openai_example_runs(trained, shapes, capsys):
    """README's "Chat and serve" example, run as written against a served model (only its URL and image change)."""
    import re

    from tinyml_cli.config import load_config
    from tinyml_cli.stages.serve import load_server
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = re.search(r"<!-- openai-example -->\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and "runs/shapes/images/003000.png" in code
    app, _, _ = load_server(trained, load_config(None, []))
    with serving(app) as url:
        exec(code.replace("http://127.0.0.1:8000", url)
             .replace("runs/shapes/images/003000.png", str(shapes / "images" / "000048.png")), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] and lines[0] == lines[1]  # the same answer, whole and streamed
