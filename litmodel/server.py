"""The OpenAI-compatible HTTP API (FastAPI) over a continuous-batching engine (`litmodel.batching`).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Each HTTP request becomes one `litmodel.generation_request.Request`; the engine runs in its own thread and
hands its outputs to the request's asyncio queue, so the event loop only parses JSON and writes bytes.
Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for invalid requests,
401 for a missing or wrong API key, 429 when every slot is busy and the waiting queue is full.
`generate/serve.py` builds the engine and runs this app with uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from litmodel.utils import LitModelError

try:  # an optional extra: say how to install it instead of a traceback
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict
except ImportError as err:  # pragma: no cover - depends on the environment
    raise LitModelError(f'serving needs FastAPI and uvicorn ({err.name} is missing): pip install -e ".[serve]"'
                        ) from None

from litmodel.batching import EngineThread, QueueFull
from litmodel.generation_request import Output, Request, SamplingParams

# OpenAI fields litmodel does not implement: refused (400) rather than silently ignored when set
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias")


# ---- request bodies (strict: "5" is not an int; unknown fields are ignored) ----------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # an extension (vLLM has it too)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: Union[str, list[dict], None] = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int]]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---- turning a body into a request ----------------------------------------------------------------------
def _sampling(body: _Body, max_tokens: int | None, default_max: int, stop_ids) -> SamplingParams:
    for name in UNSUPPORTED:
        value = (body.model_extra or {}).get(name)
        if value not in (None, False, 0, [], {}):
            raise APIError(400, f"{name!r} is not supported by this server; leave it out", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name!r} is not supported by this server; leave it out or set it to 0", param=name)
    if body.n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got n={body.n}; send n separate requests", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not (0 <= temperature <= 2):
        raise APIError(400, f"temperature must be in [0, 2] (0 = greedy), got {temperature}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not (0 < top_p <= 1):
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if body.top_k is not None and body.top_k < 1 and body.top_k != -1:
        raise APIError(400, f"top_k must be >= 1 (or -1 for no limit), got {body.top_k}", param="top_k")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max, temperature=temperature,
                          top_k=None if body.top_k in (None, -1) else body.top_k, top_p=top_p, seed=body.seed,
                          stop=stop, stop_ids=set(stop_ids))


def _message_text(m: ChatMessage) -> str | None:
    if isinstance(m.content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    return m.content


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(runner: EngineThread, tokenizer, model_name: str, api_key: str | None = None,
               shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving ``runner``'s engine under the name ``model_name``. The app starts the engine
    thread on startup and stops it on shutdown (in-flight requests get ``shutdown_timeout`` seconds)."""
    engine = runner.engine
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, runner.stop, shutdown_timeout)

    app = FastAPI(title="litmodel", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return error_response(400, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", param=loc or None)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key; send the header 'Authorization: Bearer KEY'",
                                      type="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": engine.num_active, "waiting": len(engine.waiting),
                "max_batch_size": engine.max_batch_size, "max_seq_length": engine.max_seq_length, **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "litmodel", "max_model_len": engine.max_seq_length}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, raw: HTTPRequest):
        if not body.messages:
            raise APIError(400, "messages is empty; send at least one message", param="messages")
        messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        try:  # exactly what generate/chat.py sends
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except LitModelError as err:
            raise APIError(400, str(err), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        default = max(engine.max_seq_length - len(ids), 1)  # the rest of the context, as OpenAI does
        params = _sampling(body, max_tokens, default, tokenizer.end_of_turn_ids)
        return await _serve(raw, body, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, raw: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not (0 <= i < len(tokenizer)) for i in ids):
                raise APIError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        params = _sampling(body, body.max_tokens, 16, tokenizer.stop_ids)  # 16: OpenAI's default here
        return await _serve(raw, body, ids, params, chat=False)

    async def _serve(raw: HTTPRequest, body: _Body, ids: list[int], params: SamplingParams, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()

        def on_output(out: Output) -> None:  # called in the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                out.request.cancel()

        req = Request(list(ids), params, on_output)
        try:
            runner.submit(req)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}", type="rate_limit_error", code="queue_full") from None
        except LitModelError as err:
            param = "max_tokens" if "max_tokens" in str(err) else None
            raise APIError(400, str(err), param=param) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(req, queue, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while not req.done.is_set() or not queue.empty():
            try:
                out = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await raw.is_disconnected():  # nobody will read the answer: free the slot
                    req.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            if out.finish_reason is not None:
                break
        if req.finish_reason == "error":
            return error_response(500, f"generation failed: {req.error}", type="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": req.text}
        else:
            choice["text"] = req.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": _usage(req)}

    async def _stream(req: Request, queue: asyncio.Queue, rid: str, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                out: Output = await queue.get()
                if out.finish_reason == "error":
                    err = {"error": {"message": f"generation failed: {req.error}", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if out.finish_reason is not None:
                    if out.text:
                        yield chunk(out.text, None)
                    yield chunk(None, out.finish_reason)
                    break
                if out.text:
                    yield chunk(out.text, None)
            if include_usage:
                data = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [],
                        "usage": _usage(req)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the slot if it still decodes
            if req.finish_reason is None:
                req.cancel()

    return app


def _usage(req: Request) -> dict:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": req.completion_tokens, "total_tokens": n + req.completion_tokens}
