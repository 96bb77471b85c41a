"""OpenAI-compatible HTTP API (FastAPI) in front of the BatchEngine worker."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SERVE_DEFAULT_MAX_TOKENS, SERVE_SHUTDOWN_TIMEOUT_S, SamplingParams
from .engine import MAX_DRAFT, BatchEngine, EngineStopped, GenRequest, QueueFull

log = logging.getLogger("mtpdraft.serve")

MAX_BODY_BYTES = 4 << 20
MAX_LOGPROBS = 20  # alternatives per token (completions `logprobs`, chat `top_logprobs`)


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


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


# JSON Schema's integer: 2.0 is one, "2" and 2.5 are not (the bounds go first: the schema shows them)
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
TopN = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(_integral)]
DraftLen = Annotated[int, Field(ge=1, le=MAX_DRAFT), BeforeValidator(_integral)]
Temperature = Annotated[float, Field(ge=0, le=100)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: NonNegative | None = None  # extension
    seed: NonNegative | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Count | None = 1
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None  # token id -> [-100, 100]
    # extensions
    speculative: bool | None = None
    draft_len: DraftLen | None = None
    ignore_eos: bool | None = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[NonNegative], list[list[NonNegative]]]
    echo: bool | None = False
    logprobs: TopN | None = None
    best_of: Count | None = None
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
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: TopN | None = None


@dataclass
class Choice:
    """One sequence a request asks for: which prompt, and what echo puts before it."""

    prompt: int  # index into the request's prompts
    ids: list[int]
    sp: SamplingParams
    echo_text: str = ""


# -- the app -------------------------------------------------------------------------------------
def create_app(engine: BatchEngine, model_id: str, *, default_max_tokens: int = SERVE_DEFAULT_MAX_TOKENS,
               shutdown_timeout: float = SERVE_SHUTDOWN_TIMEOUT_S):
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
        return err(e.status_code, str(e.detail), t, code="body_too_large" if e.status_code == 413 else None)

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
            too_large = f"request body larger than {MAX_BODY_BYTES} bytes"
            headers = dict(scope.get("headers") or [])
            cl = headers.get(b"content-length")
            if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY_BYTES):
                resp = JSONResponse(error_body(too_large, "invalid_request_error", None, "body_too_large"),
                                    status_code=413)
                engine.metrics.http_response(413)
                return await resp(scope, receive, send)
            received = 0

            async def capped_receive():  # a chunked body has no content-length: count what arrives
                nonlocal received
                msg = await receive()
                if msg["type"] == "http.request":
                    received += len(msg.get("body", b""))
                    if received > MAX_BODY_BYTES:
                        raise StarletteHTTPException(413, too_large)
                return msg

            async def counting_send(msg):
                if msg["type"] == "http.response.start":
                    engine.metrics.http_response(msg["status"])
                await send(msg)

            await self.inner(scope, capped_receive, counting_send)

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

    # -- request -> choices -----------------------------------------------------------------------
    def check_model(body: _Common):
        if body.model != model_id:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    def check_common(body: _Common, n_prompts: int) -> int:
        """Request-wide checks; returns n."""
        n = 1 if body.n is None else body.n
        if n * n_prompts > engine.max_queue:
            raise APIError(400, f"n times the number of prompts must be in 1..{engine.max_queue}, got "
                                f"{n} x {n_prompts}", param="n", code="invalid_value")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options",
                           code="invalid_value")
        return n

    def logit_bias(body: _Common) -> dict[int, float]:
        out = {}
        for key, v in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= engine.model.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {engine.model.vocab_size}), "
                                    f"got {key!r}", param="logit_bias", code="invalid_value")
            out[int(key)] = v
        return out

    def sampling(body: _Common, prompt_ids: list[int], max_tokens: int | None, default: int,
                 choice: int) -> SamplingParams:
        """The SamplingParams of one choice (choice j of n samples with seed + j)."""
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
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed the "
                                f"context of {engine.max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = body.stop if body.stop is not None else ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop", code="invalid_value")
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed
        if seed is not None:
            if seed >= 2 ** 63 - engine.max_queue:
                raise APIError(400, f"seed must be below 2**63 - {engine.max_queue}", param="seed",
                               code="invalid_value")
            seed += choice
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                                  top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=stop,
                                  ignore_eos=bool(body.ignore_eos), presence_penalty=body.presence_penalty or 0.0,
                                  frequency_penalty=body.frequency_penalty or 0.0, logit_bias=logit_bias(body))
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    def encode(text: str, param: str, **kw) -> list[int]:
        if len(text) > engine.max_context * 32:
            raise APIError(400, f"{param} is far longer than the context of {engine.max_context} tokens",
                           param=param, code="context_length_exceeded")
        try:
            return tok(text, **kw).input_ids
        except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot take
            raise APIError(400, f"{param} could not be tokenized: {type(e).__name__}", param=param,
                           code="invalid_value") from None

    # -- running them -------------------------------------------------------------------------------
    async def run(request: Request, choices: list[Choice], body: _Common, kind: str, top_n: int | None,
                  echo_logprobs: bool = False):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        spec = True if body.speculative is None else body.speculative
        grs = []
        for c, ch in enumerate(choices):
            def emit(ev, c=c):
                loop.call_soon_threadsafe(q.put_nowait, (c, ev))

            grs.append(GenRequest(prompt_ids=ch.ids, sp=ch.sp, emit=emit, speculative=spec, draft_len=body.draft_len,
                                  id=f"{rid}-{c}", stream=bool(body.stream), logprobs=top_n,
                                  prompt_logprobs=echo_logprobs))
        try:
            engine.submit(*grs)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        if not engine.alive:
            for gr in grs:
                gr.cancel()
            raise APIError(503, "the decoding worker is not running", "server_error", code="worker_dead")
        n_prompt = sum(len(ids) for ids in {ch.prompt: ch.ids for ch in choices}.values())
        out = Output(kind, tok, choices, rid, model_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(grs, q, out, n_prompt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        infos = [None] * len(grs)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while None in infos:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client hung up: free its rows now (finally)
                    get.cancel()
                    return Response(status_code=499)
                c, ev = get.result()
                if ev[0] == "error":
                    raise APIError(500, ev[1], "server_error", code="decode_failed")
                if ev[0] == "done":
                    infos[c] = ev[1]
        finally:
            gone.cancel()
            for gr in grs:
                gr.cancel()  # no-op once finished; frees the rows if the handler is abandoned
            engine.wake()
        if any(info["finish_reason"] == "cancelled" for info in infos):
            raise APIError(503, "the request was cancelled (server shutting down)", "server_error", code="cancelled")
        body_ = {"id": rid, "object": out.object, "created": int(time.time()), "model": model_id,
                 "choices": [out.final_choice(c, info, gr, len(grs) > 1) for c, (info, gr) in
                             enumerate(zip(infos, grs))],
                 "usage": usage(n_prompt, sum(len(info["token_ids"]) for info in infos)),
                 "mtpdraft": ext(grs[0], infos[0])}
        return JSONResponse(body_)

    async def stream(grs: list[GenRequest], q: asyncio.Queue, out: "Output", n_prompt: int, include_usage: bool):
        n_gen = 0
        try:
            for c in range(len(grs)):
                first = out.first_chunk(c)
                if first is not None and not grs[c].prompt_logprobs:
                    yield sse(out.chunk(first))
            left = len(grs)
            while left:
                c, ev = await q.get()
                if ev[0] == "prompt":
                    yield sse(out.chunk(out.echo_chunk(c, ev[1])))
                elif ev[0] == "tokens":
                    if ev[2] or ev[3]:
                        yield sse(out.chunk(out.delta(c, ev[2], ev[3])))
                elif ev[0] == "error":
                    yield sse(error_body(ev[1], "server_error", code="decode_failed"))
                    break
                else:
                    info = ev[1]
                    if info["finish_reason"] == "cancelled":
                        yield sse(error_body("the request was cancelled (server shutting down)", "server_error",
                                             code="cancelled"))
                        break
                    n_gen += len(info["token_ids"])
                    yield sse(out.chunk(out.last_delta(c, info), mtpdraft=ext(grs[c], info)))
                    left -= 1
            else:
                if include_usage:
                    yield sse(out.chunk(None, usage=usage(n_prompt, n_gen)))
            yield "data: [DONE]\n\n"
        finally:
            for gr in grs:
                gr.cancel()  # a client that went away frees its rows at the next cycle
            engine.wake()

    def usage(n_prompt, n_gen):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    # -- endpoints --------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        if body.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of", code="unsupported_value")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        p = body.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            p = [p]
        prompts = [(encode(x, "prompt"), x) if isinstance(x, str) else (list(x), None) for x in p] or [([], None)]
        n = check_common(body, len(prompts))
        choices = []
        for i, (ids, text) in enumerate(prompts):
            echo = (text if text is not None else tok.decode(ids)) if body.echo else ""
            choices += [Choice(i, ids, sampling(body, ids, body.max_tokens, default_max_tokens, j), echo)
                        for j in range(n)]
        return await run(request, choices, body, "completion", body.logprobs, bool(body.echo) and
                         body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {model_id!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        msgs = []
        for m in body.messages:
            c = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            msgs.append({"role": m.role, "content": c or ""})
        encode("".join(m["content"] for m in msgs), "messages")  # length and tokenizability first
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
            raise APIError(400, f"chat template failed: {e}", param="messages", code="invalid_messages") from None
        ids = encode(text, "messages", add_special_tokens=False)
        n = check_common(body, 1)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = [Choice(0, ids, sampling(body, ids, max_tokens, 0, j)) for j in range(n)]
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        return await run(request, choices, body, "chat", top_n)

    return app


def ext(gr: GenRequest, info: dict) -> dict:
    """The `mtpdraft` extension of a response: the request's decoding statistics."""
    d = info["stats"].as_dict()
    d.update(token_ids=info["token_ids"], finish_reason=info["finish_reason"], speculative=gr.row is not None and gr.row.drafter is not None)
    return d


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def finish_reason(info: dict) -> str:
    return "length" if info["finish_reason"] == "length" else "stop"  # eos and stop strings are both "stop"


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


class Output:
    """OpenAI response shapes (text_completion / chat.completion and their chunks) for one request."""

    def __init__(self, kind: str, tok, choices: list[Choice], rid: str, model: str):
        self.kind, self.tok, self.choices, self.rid, self.model = kind, tok, choices, rid, model
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.offsets = [len(ch.echo_text) for ch in choices]  # next generated token's text_offset
        self.streamed = [0] * len(choices)  # characters of generated text streamed, per choice

    # logprobs
    def token_str(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False)

    def completion_logprobs(self, c: int, lps, prompt: bool = False) -> dict:
        """Completions' shape; prompt=True: lps score the prompt from its 2nd token on."""
        tokens, chosen, tops, offsets = [], [], [], []
        at = self.offsets[c]
        if prompt:  # the first prompt token has no logprob; offsets count from the echoed text's start
            first = self.token_str(self.choices[c].ids[0])
            tokens, chosen, tops, offsets, at = [first], [None], [None], [0], len(first)
        for t, lp, top in lps:
            s = self.token_str(t)
            tokens.append(s)
            chosen.append(lp)
            tops.append({self.token_str(i): v for i, v in top})
            offsets.append(at)
            at += len(s)
        if not prompt:
            self.offsets[c] = at
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, lps) -> dict:
        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in lps],
                "refusal": None}

    def logprobs(self, c: int, lps):
        if lps is None:
            return None
        return self.chat_logprobs(lps) if self.kind == "chat" else self.completion_logprobs(c, lps)

    # choices
    def final_choice(self, c: int, info: dict, gr: GenRequest, with_ext: bool) -> dict:
        text = info["text"] or ""
        fr = finish_reason(info)
        if self.kind == "chat":
            d = {"index": c, "message": {"role": "assistant", "content": text},
                 "logprobs": self.logprobs(c, info["logprobs"]), "finish_reason": fr}
        else:
            lps = None
            if info["prompt_logprobs"] is not None:
                lps = self.completion_logprobs(c, info["prompt_logprobs"], prompt=True)
            if info["logprobs"] is not None:
                more = self.completion_logprobs(c, info["logprobs"])
                lps = more if lps is None else {k: lps[k] + more[k] for k in lps}
            d = {"index": c, "text": self.choices[c].echo_text + text, "logprobs": lps, "finish_reason": fr}
        if with_ext:
            d["mtpdraft"] = ext(gr, info)
        return d

    def first_chunk(self, c: int) -> dict | None:
        """What a stream sends before any token: the chat role, the echoed prompt."""
        if self.kind == "chat":
            return {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        if self.choices[c].echo_text:
            return {"index": c, "text": self.choices[c].echo_text, "logprobs": None, "finish_reason": None}
        return None

    def echo_chunk(self, c: int, prompt_lps) -> dict:
        return {"index": c, "text": self.choices[c].echo_text,
                "logprobs": self.completion_logprobs(c, prompt_lps, prompt=True), "finish_reason": None}

    def delta(self, c: int, text: str, lps, fr=None) -> dict:
        self.streamed[c] += len(text)
        if self.kind == "chat":
            return {"index": c, "delta": {"content": text} if text else {}, "logprobs": self.logprobs(c, lps),
                    "finish_reason": fr}
        return {"index": c, "text": text, "logprobs": self.logprobs(c, lps), "finish_reason": fr}

    def last_delta(self, c: int, info: dict) -> dict:
        text = (info["text"] or "")[self.streamed[c]:]
        return self.delta(c, text, None, finish_reason(info))

    def chunk(self, choice: dict | None, **extra) -> dict:
        d = {"id": self.rid, "object": self.object + (".chunk" if self.kind == "chat" else ""),
             "created": int(time.time()), "model": self.model, "choices": [] if choice is None else [choice]}
        d.update(extra)
        return d
