"""serve: an OpenAI-compatible HTTP server over a model folder or an ONNX export.

Routes: `GET /v1/models`, `POST /v1/chat/completions` (non-streamed, or streamed as server-sent events; image parts
as data URLs, or as file paths under the image root), `GET /health`. Any bad request gets an HTTP 4xx with
OpenAI's error object `{"error": {"message", "type", "param", "code"}}`; nothing a client sends stops the server.

The stack is Starlette on uvicorn (the `serve` extra): Starlette is the ASGI toolkit FastAPI is built on, kept by
the Encode team, with two dependencies (anyio, typing-extensions); the requests are validated here, by hand,
into OpenAI's own error shapes (FastAPI's pydantic validation would answer with its own 422 shape instead).
One model thread answers one request at a time, in arrival order; the others wait in a bounded queue (503 when
it is full). So concurrent answers are exactly the answers each request gets alone, never interleaved: a
stream's pieces go to the queue of its own request only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .. import IMAGE_TOKEN, UserError
from ..records.conversations import ImageBytes, check_image

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Limits:
    max_body_bytes: int = 64 << 20
    max_image_bytes: int = 16 << 20
    max_images: int = 8  # per request
    max_new_tokens: int = 2048  # the most a request may ask for (max_tokens)
    max_queue: int = 64  # requests waiting or running; more get 503


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]
    images: list = field(default_factory=list)
    gen: SimpleNamespace = None
    stream: bool = False
    include_usage: bool = False
    seed: int = 0


def _bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> RequestError:
    return RequestError(status, message, param, code)


def image_of(url, image_root: Path, limits: Limits, param: str):
    """An image part's url: a data URL (base64) becomes in-memory bytes, a path (or file:// URL) must lie under the
    image root; the image's size and pixels are checked and it is decoded once here."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url.url must be a string", param)
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head or not data:
            raise _bad("an image data URL must be base64: data:image/png;base64,...", param)
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise _bad(f"image of about {len(data) * 3 // 4:,} bytes is over the {limits.max_image_bytes:,}-byte limit",
                       param, "image_too_large", 413)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URL is not valid base64", param) from None
        img = ImageBytes(raw, f"request image {len(raw):,} bytes")
    elif url.startswith(("http://", "https://")):
        raise _bad("remote image URLs are not fetched: send the image as a data URL (or a path under the "
                   "server's image root)", param, "unsupported_image_url")
    else:
        path = Path(url.removeprefix("file://")).expanduser()
        path = (image_root / path).resolve() if not path.is_absolute() else path.resolve()
        if not path.is_relative_to(image_root.resolve()):
            raise _bad(f"image path outside the server's image root ({image_root}): {url}", param)
        if not path.is_file():
            raise _bad(f"image not found: {url}", param)
        if path.stat().st_size > limits.max_image_bytes:
            raise _bad(f"image of {path.stat().st_size:,} bytes is over the {limits.max_image_bytes:,}-byte limit",
                       param, "image_too_large", 413)
        img = path
    try:
        check_image(img, decode=True)
    except ValueError as e:
        raise _bad(f"bad image: {e}", param, "invalid_image") from None
    return img


def _content(content, role: str, i: int, image_root: Path, limits: Limits, images: list) -> str:
    """A message's content as text with `<image>` where each image goes (its images appended to `images`)."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise _bad("content must be a string or a non-empty list of parts", param)
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise _bad(f"'{IMAGE_TOKEN}' is reserved: send images as image_url parts", f"{param}[{j}]")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise _bad("images go in user messages", f"{param}[{j}]")
            if len(images) >= limits.max_images:
                raise _bad(f"at most {limits.max_images} images per request", f"{param}[{j}]")
            ref = part.get("image_url")
            images.append(image_of(ref.get("url") if isinstance(ref, dict) else ref, image_root, limits,
                                   f"{param}[{j}].image_url"))
            texts.append(IMAGE_TOKEN)
        else:
            raise _bad("a content part is {\"type\": \"text\", \"text\"} or {\"type\": \"image_url\", \"image_url\": "
                       "{\"url\"}}", f"{param}[{j}]")
    return "\n".join(texts)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not lo <= v <= hi:
        raise _bad(f"{key} must be {'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], got {v!r}", key)
    return v


UNSUPPORTED = {"tools": "tools", "tool_choice": "tool choice", "functions": "functions", "function_call": "functions",
               "logprobs": "log-probs", "audio": "audio", "prediction": "predicted outputs"}


def parse_chat_request(body, model_id: str, gen, image_root: Path, limits: Limits) -> ChatRequest:
    """A chat completion request as messages, images and generation settings; RequestError for anything wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("model") not in (None, model_id):
        raise _bad(f"model '{body['model']}' does not exist: this server has '{model_id}'", "model",
                   "model_not_found", 404)
    for key, what in UNSUPPORTED.items():
        if body.get(key):
            raise _bad(f"{what} are not supported by this server", key, "unsupported_parameter")
    if body.get("stop"):
        raise _bad("stop sequences are not supported by this server", "stop", "unsupported_parameter")
    if (body.get("response_format") or {}).get("type", "text") != "text":
        raise _bad("only text responses are supported", "response_format", "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise _bad("n must be 1", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0, -2, 2):
            raise _bad(f"{key} is not supported by this server (leave it 0)", key, "unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content}", "messages")
    msgs, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad("a message must be an object with role and content", f"messages[{i}]")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise _bad(f"role must be system, developer, user or assistant, got {m.get('role')!r}", f"messages[{i}].role")
        msgs.append({"role": role, "content": _content(m.get("content"), role, i, image_root, limits, images)})
    if msgs[-1]["role"] != "user":
        raise _bad("the last message must be a user message", "messages")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_new = _number({key: limit}, key, gen.max_new_tokens, 1, limits.max_new_tokens, integer=True)
    settings = SimpleNamespace(max_new_tokens=max_new, temperature=_number(body, "temperature", gen.temperature, 0, 2),
                               top_p=_number(body, "top_p", gen.top_p, 1e-9, 1))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    seed = _number(body, "seed", 0, -(2 ** 63), 2 ** 63 - 1, integer=True)
    return ChatRequest(msgs, images, settings, stream, bool(options.get("include_usage")), seed % (2 ** 32))


class ModelWorker:
    """The one thread that runs the model: jobs run one at a time in arrival order, at most `max_queue` at once."""

    def __init__(self, max_queue: int):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyml-model")
        self.max_queue, self.outstanding, self.lock = max_queue, 0, threading.Lock()

    def submit(self, fn):
        with self.lock:
            if self.outstanding >= self.max_queue:
                raise RequestError(503, f"the server is busy ({self.max_queue} requests queued): try again",
                                   code="server_busy")
            self.outstanding += 1
        future = self.pool.submit(fn)
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self):
        with self.lock:
            self.outstanding -= 1


class _Cancelled(Exception):
    """The client of a streamed request went away: its generation stops."""


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def create_app(bot, model_id: str, gen, image_root: str | Path = ".", limits: Limits | None = None):
    """The ASGI app answering for `bot` (a stages.chat.Chatbot, or anything with encode / reply)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise UserError("tinyml serve needs the serve extra: pip install 'tinyml-cli[serve]'") from None
    limits = limits or Limits()
    root = Path(image_root)
    worker = ModelWorker(limits.max_queue)
    created = int(time.time())

    def error(e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise _bad(f"request body of {int(size):,} bytes is over the {limits.max_body_bytes:,}-byte limit",
                       status=413, code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise _bad(f"request body is over the {limits.max_body_bytes:,}-byte limit", status=413,
                           code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": "tinyml"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "queued": worker.outstanding})

    async def completions(request):
        try:
            req = parse_chat_request(await read_json(request), model_id, gen, root, limits)
            try:
                prompt = bot.encode(req.messages, req.images)
            except UserError as e:
                long = "longer than" in str(e)
                raise _bad(str(e), "messages", "context_length_exceeded" if long else None) from None
            rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                return StreamingResponse(_events(req, prompt, rid, now), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            future = worker.submit(lambda: bot.reply(req.messages, req.images, req.gen, None, req.seed, prompt))
            reply = await asyncio.wrap_future(future)
        except RequestError as e:
            return error(e)
        except UserError as e:
            return error(_bad(str(e)))
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                          "finish_reason": reply.finish_reason}],
                             "usage": _usage(reply)})

    def _events(req, prompt, rid, now):
        """The SSE body of a streamed request: submitted to the model thread at once (so a full queue is refused
        before the stream starts), its pieces read back through this request's own asyncio queue."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_text(piece):
            if cancel.is_set():
                raise _Cancelled()
            loop.call_soon_threadsafe(pieces.put_nowait, ("text", piece))

        future = worker.submit(lambda: bot.reply(req.messages, req.images, req.gen, on_text, req.seed, prompt))
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, ("done", f)))

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await pieces.get()
                    if kind == "text":
                        yield chunk({"content": value})
                        continue
                    try:
                        reply = value.result()
                    except Exception as e:  # noqa: BLE001 - reported to the client in the stream, the server goes on
                        message = str(e) if isinstance(e, UserError) else f"internal error: {type(e).__name__}"
                        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                        break
                    yield chunk({}, reply.finish_reason)
                    if req.include_usage:
                        yield chunk({}, usage=_usage(reply), choices=False)
                    yield "data: [DONE]\n\n"
                    break
            finally:
                cancel.set()
        return events()

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(RequestError(status, message.get(status, getattr(exc, "detail", "bad request"))))

    async def internal(request, exc):
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/chat/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal})


def bind(host: str, port: int):
    """A listening socket, bound here so that a port in use is one line of error rather than a server log."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(app, sock, log_level: str = "warning") -> None:
    """Serve `app` on a bound socket until Ctrl-C (uvicorn)."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=log_level == "info", lifespan="off",
                                  timeout_graceful_shutdown=5)).run(sockets=[sock])


def load_server(model_dir: str | Path, cfg, model_name: str | None = None, image_root: str | Path = ".",
                limits: Limits | None = None):
    """(the app, its model id) for a model folder or an ONNX export."""
    from .chat import Chatbot, model_kind
    model_kind(model_dir)  # a user error for a folder that holds neither, before any import
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("tinyml serve needs the serve extra: pip install 'tinyml-cli[serve]'") from None
    model_id = model_name or Path(model_dir).resolve().name
    bot = Chatbot(model_dir, cfg)
    return create_app(bot, model_id, cfg.gen, image_root, limits), model_id, bot.kind
