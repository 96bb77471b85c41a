"""OpenAI-compatible HTTP API (FastAPI) in front of the BatchEngine worker."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingParams, SpecParams
from .engine import BatchEngine, EngineStopped, GenRequest, QueueFull

log = logging.getLogger("mtpdraft.serve")

MAX_BODY_BYTES = 4 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- request schemas (unknown fields are an error; ints and bools are strict) -------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    speculative: bool | None = None
    draft_len: int | None = None
    ignore_eos: bool | None = None


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


# -- the app -------------------------------------------------------------------------------------
def create_app(engine: BatchEngine, model_id: str, *, default_max_tokens: int = 16, shutdown_timeout: float = 10.0):
    tok = engine.tok
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not engine.alive:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, shutdown_timeout)

    app = FastAPI(title="mtpdraft", lifespan=lifespan)
    engine.metrics.gauges = lambda: {
        "mtpdraft_active_rows": ("Rows (requests) in the running batch.", engine.num_active),
        "mtpdraft_queued_requests": ("Requests waiting for a free row.", engine.num_pending),
        "mtpdraft_worker_alive": ("1 while the decoding worker runs.", int(engine.alive)),
    }

    def err(status, message, type_="invalid_request_error", param=None, code=None):
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return err(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return err(400, f"malformed JSON body: {first.get('msg', '')}", code="invalid_json")
        if first.get("type") == "extra_forbidden":
            return err(400, f"unknown field {'.'.join(loc)!r}", param=".".join(loc) or None, code="unknown_field")
        if first.get("type") == "missing":
            return err(400, f"missing required field {'.'.join(loc)!r}", param=".".join(loc) or None,
                       code="missing_field")
        msgs = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ()) if x != 'body') or 'body'}: {d.get('msg')}"
                         for d in errs[:3])
        return err(400, f"invalid request: {msgs}", param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        t = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return err(e.status_code, str(e.detail), t)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error")
        engine.metrics.http_response(500)
        return err(500, f"internal error: {type(e).__name__}", "server_error")

    class _Guard:
        """Pure ASGI middleware (keeps streaming and disconnects intact): body size cap, status counts."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            headers = dict(scope.get("headers") or [])
            cl = headers.get(b"content-length")
            if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY_BYTES):
                resp = JSONResponse(error_body(f"request body larger than {MAX_BODY_BYTES} bytes",
                                               "invalid_request_error", None, "body_too_large"), status_code=413)
                engine.metrics.http_response(413)
                return await resp(scope, receive, send)

            async def counting_send(msg):
                if msg["type"] == "http.response.start":
                    engine.metrics.http_response(msg["status"])
                await send(msg)

            await self.inner(scope, receive, counting_send)

    app.add_middleware(_Guard)

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "dead", "model": model_id, "active_rows": engine.num_active,
                "queued": engine.num_pending, "max_batch": engine.max_batch}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "mtpdraft", "max_context": engine.max_context}]}

    @app.get("/v1/models/{mid:path}")
    async def model_info(mid: str):
        if mid != model_id:
            raise APIError(404, f"The model {mid!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mtpdraft"}

    # -- request -> GenRequest ------------------------------------------------------------------
    def common(body: _Common, prompt_ids: list[int], max_tokens: int | None, default: int = default_max_tokens):
        if body.model != model_id:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (must be 0)", param=name, code="unsupported_value")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_value")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty (it encodes to zero tokens)", param="prompt", code="empty_prompt")
        if any(not 0 <= t < engine.model.vocab_size for t in prompt_ids):
            raise APIError(400, f"token ids must be in [0, {engine.model.vocab_size})", param="prompt",
                           code="invalid_value")
        room = engine.max_context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                                f"{engine.max_context} tokens", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default, room) if default else room
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed the "
                                f"context of {engine.max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = body.stop if body.stop is not None else ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop", code="invalid_value")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 100:
            raise APIError(400, f"temperature must be in [0, 100], got {temperature}", param="temperature",
                           code="invalid_value")
        if body.seed is not None and not 0 <= body.seed < 2 ** 63:
            raise APIError(400, "seed must be in [0, 2**63)", param="seed", code="invalid_value")
        try:
            sp = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop,
                                ignore_eos=bool(body.ignore_eos))
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        if body.draft_len is not None:
            try:
                SpecParams(draft_len=body.draft_len)
            except ValueError as e:
                raise APIError(400, str(e), param="draft_len", code="invalid_value") from None
        spec = True if body.speculative is None else body.speculative
        return sp, spec

    def check_len(s: str, param: str):
        if len(s) > engine.max_context * 32:
            raise APIError(400, f"{param} is far longer than the context of {engine.max_context} tokens",
                           param=param, code="context_length_exceeded")

    async def run(request: Request, prompt_ids, sp, spec, body: _Common, kind: str):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        gr = GenRequest(prompt_ids=prompt_ids, sp=sp, emit=emit, speculative=spec, draft_len=body.draft_len, id=rid)
        try:
            engine.submit(gr)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        if not engine.alive:
            gr.cancel()
            raise APIError(503, "the decoding worker is not running", "server_error", code="worker_dead")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(gr, q, rid, kind, len(prompt_ids), include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        ids: list[int] = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "tokens":
                    ids.extend(ev[1])
                elif ev[0] == "error":
                    raise APIError(500, ev[1], "server_error", code="decode_failed")
                else:
                    info = ev[1]
                    break
        finally:
            gr.cancel()  # no-op once finished; frees the row if the handler is abandoned
            engine.wake()
        if info["finish_reason"] == "cancelled":
            raise APIError(503, "the request was cancelled (server shutting down)", "server_error", code="cancelled")
        return JSONResponse(final_body(gr, rid, kind, info, len(prompt_ids)))

    def usage(n_prompt, n_gen):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def ext(gr: GenRequest, info):
        d = info["stats"].as_dict()
        d.update(token_ids=info["token_ids"], finish_reason=info["finish_reason"],
                 speculative=gr.drafter is not None)
        return d

    def finish_reason(r):
        return "length" if r == "length" else "stop"

    def final_body(gr, rid, kind, info, n_prompt):
        text = info["text"] or ""
        fr = finish_reason(info["finish_reason"])
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": fr}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": fr}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [choice],
                "usage": usage(n_prompt, len(info["token_ids"])), "mtpdraft": ext(gr, info)}

    def chunk(rid, kind, delta_text, fr=None, role=False, extra=None):
        if kind == "chat":
            delta = {"role": "assistant", "content": delta_text} if role else (
                {"content": delta_text} if delta_text else {})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}
            obj = "chat.completion.chunk"
        else:
            c = {"index": 0, "text": delta_text, "logprobs": None, "finish_reason": fr}
            obj = "text_completion"
        d = {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [c]}
        if extra:
            d.update(extra)
        return "data: " + json.dumps(d) + "\n\n"

    async def stream(gr: GenRequest, q: asyncio.Queue, rid, kind, n_prompt, include_usage):
        ids: list[int] = []
        sent = 0
        holdback = max((len(s) for s in gr.sp.stop), default=1) - 1
        try:
            if kind == "chat":
                yield chunk(rid, kind, "", role=True)
            while True:
                ev = await q.get()
                if ev[0] == "tokens":
                    ids.extend(ev[1])
                    text = tok.decode(ids, skip_special_tokens=True)
                    safe = len(text) - holdback
                    if safe > sent and not text[:safe].endswith("\ufffd"):
                        yield chunk(rid, kind, text[sent:safe])
                        sent = safe
                elif ev[0] == "error":
                    yield "data: " + json.dumps(error_body(ev[1], "server_error", code="decode_failed")) + "\n\n"
                    break
                else:
                    info = ev[1]
                    if info["finish_reason"] == "cancelled":
                        yield "data: " + json.dumps(error_body("the request was cancelled (server shutting down)",
                                                               "server_error", code="cancelled")) + "\n\n"
                        break
                    text = info["text"] or ""
                    yield chunk(rid, kind, text[sent:] if len(text) > sent else "",
                                fr=finish_reason(info["finish_reason"]), extra={"mtpdraft": ext(gr, info)})
                    if include_usage:
                        d = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": model_id, "choices": [],
                             "usage": usage(n_prompt, len(info["token_ids"]))}
                        yield "data: " + json.dumps(d) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            gr.cancel()  # a client that went away frees its row at the next cycle
            engine.wake()

    # -- endpoints --------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        if body.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        if body.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of", code="unsupported_value")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        p = body.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt",
                               code="unsupported_value")
            p = p[0]
        if isinstance(p, str):
            check_len(p, "prompt")
            ids = tok(p).input_ids
        else:
            ids = list(p)
        sp, spec = common(body, ids, body.max_tokens)
        return await run(request, ids, sp, spec, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        if body.model != model_id:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        msgs = []
        for m in body.messages:
            c = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            msgs.append({"role": m.role, "content": c or ""})
        check_len("".join(m["content"] for m in msgs), "messages")
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
            raise APIError(400, f"chat template failed: {e}", param="messages", code="invalid_messages") from None
        ids = tok(text, add_special_tokens=False).input_ids
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sp, spec = common(body, ids, max_tokens, default=0)
        return await run(request, ids, sp, spec, body, "chat")

    return app
