"""The OpenAI-compatible server: real uvicorn on 127.0.0.1, tiny random models, the official client."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from mtpdraft import load  # noqa: E402
from mtpdraft.config import SamplingParams, SpecParams  # noqa: E402
from mtpdraft.decoding.engine import eos_ids_of, generate  # noqa: E402
from mtpdraft.decoding.stops import StopChecker  # noqa: E402
from mtpdraft.drafters import make_drafter  # noqa: E402
from mtpdraft.serve import build_app  # noqa: E402
from mtpdraft.serve.metrics import parse_prometheus  # noqa: E402
from mtpdraft.testing import tiny_model_dir  # noqa: E402

CTX = 384
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Server:
    def __init__(self, model_dir, **kw):
        self.app, self.engine = build_app(str(model_dir), drafter="ngram", dtype="fp32", max_context=CTX,
                                           **{"spec_off_batch": 0, **kw})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=3, lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def metrics(self):
        return parse_prometheus(httpx.get(self.url + "/metrics").text)

    def wait_idle(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            h = httpx.get(self.url + "/health").json()
            if h["active_rows"] == 0 and h["queued"] == 0:
                return h
            assert time.monotonic() < deadline, f"rows still busy: {h}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    plain = tiny_model_dir(root / "tiny-gemma", "gemma3_text")
    chat = root / "tiny-chat"
    shutil.copytree(plain, chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(cfg))
    return plain, chat


@pytest.fixture(scope="module")
def srv(dirs):
    s = Server(dirs[1], max_batch=8, max_queue=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref(dirs):
    """A separate model instance for reference decoding with generate()."""
    model, tok = load(str(dirs[1]), "fp32")

    def run(prompt_ids, max_tokens, **kw):
        sp = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **kw)
        return list(generate(model, prompt_ids, sp, drafter=make_drafter("ngram", model), spec=SpecParams(4),
                             tokenizer=tok, max_len=CTX))

    run.tok, run.model = tok, model
    return run


PROMPTS = ["the cat sat on the mat and the cat", "abc abc abc abc", "hello world, hello", "1 2 3 4 5 6 7",
           "zebra", "once upon a time there was a time", "q", "mississippi mississippi"]


def test_models_health_metrics(srv):
    c = srv.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny-chat"]
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(srv.url + "/metrics").text
    for name in ("mtpdraft_requests_total", "mtpdraft_generation_tokens_total", "mtpdraft_draft_tokens_proposed_total",
                 "mtpdraft_draft_tokens_accepted_total", "mtpdraft_mean_acceptance_length",
                 "mtpdraft_request_latency_seconds_bucket", "mtpdraft_active_rows"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    r = httpx.get(srv.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_completion_matches_generate(srv, ref):
    c = srv.client()
    for i, p in enumerate(PROMPTS[:3]):
        r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=40, temperature=0,
                                 extra_body={"draft_len": 2 + i})
        ext = r.model_extra["mtpdraft"]
        want = ref(ref.tok(p).input_ids, 40)
        assert ext["token_ids"] == want
        assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(ref.tok(p).input_ids)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.choices[0].text == ref.tok.decode(want, skip_special_tokens=True)
        assert ext["num_tokens"] == len(want) and "mean_accepted_tokens" in ext
    # speculation off gives the same tokens
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                             extra_body={"speculative": False})
    assert r.model_extra["mtpdraft"]["token_ids"] == ref(ref.tok(PROMPTS[0]).input_ids, 40)
    assert r.model_extra["mtpdraft"]["proposed_by_position"] == []


def test_concurrent_greedy_is_exact(srv, ref):
    """Requests decoded together in one batch return exactly their single-request tokens."""
    c = srv.client()

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=30 + 5 * i, temperature=0,
                                 extra_body={"draft_len": [1, 3, 6, 8][i % 4], "speculative": i % 5 != 4})
        return p, 30 + 5 * i, r.model_extra["mtpdraft"]["token_ids"]

    before = srv.metrics()
    with ThreadPoolExecutor(10) as ex:
        results = list(ex.map(one, range(10)))
    for p, n, got in results:
        assert got == ref(ref.tok(p).input_ids, n)
    after = srv.metrics()
    # the batch really had several rows in one forward
    assert after["mtpdraft_batch_forwards_total"] - before["mtpdraft_batch_forwards_total"] < sum(
        len(g) for _, _, g in results)


def test_chat_and_streaming(srv, ref):
    c = srv.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there hi there"}]
    r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=25, temperature=0)
    rendered = "<|system|>be brief\n<|user|>hi there hi there\n<|assistant|>"
    want = ref(ref.tok(rendered, add_special_tokens=False).input_ids, 25)
    assert r.model_extra["mtpdraft"]["token_ids"] == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.tok.decode(want, skip_special_tokens=True)

    # streaming chat: the deltas add up to the same text; usage arrives at the end
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want)

    # streaming completion
    full = c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    parts = list(c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                      stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].model_extra["mtpdraft"]["token_ids"] == full.model_extra["mtpdraft"]["token_ids"]

    # raw SSE framing ends with [DONE]
    with httpx.stream("POST", srv.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "ab", "max_tokens": 5,
                                                                 "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_strings(srv, ref):
    c = srv.client()
    prompt = "abc abc abc abc"
    full = c.completions.create(model="tiny-chat", prompt=prompt, max_tokens=60, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    # a stop string from the middle of the greedy output (printable ASCII if there is some)
    starts = [i for i in range(6, len(full) - 2) if all(32 <= ord(ch) < 127 for ch in full[i:i + 2])]
    i = starts[0] if starts else len(full) // 2
    stop = full[i:i + 2]
    # reference: generate() with the library's StopChecker
    model, tok = ref.model, ref.tok
    sp = SamplingParams(max_new_tokens=60, temperature=0.0, stop=(stop,), ignore_eos=True)
    stopper = StopChecker(sp, eos_ids_of(model, tok), tok)
    list(generate(model, tok(prompt).input_ids, sp, tokenizer=tok, stopper=stopper, max_len=CTX))
    assert stopper.reason == "stop"
    cut = stopper.text()
    for stream in (False, True):
        if stream:
            parts = list(c.completions.create(model="tiny-chat", prompt=prompt, max_tokens=60, temperature=0,
                                              stop=[stop, "never-seen"], stream=True, extra_body={"ignore_eos": True}))
            text, fr = "".join(p.choices[0].text for p in parts), parts[-1].choices[0].finish_reason
            assert parts[-1].model_extra["mtpdraft"]["token_ids"] == stopper.ids
        else:
            r = c.completions.create(model="tiny-chat", prompt=prompt, max_tokens=60, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True})
            text, fr = r.choices[0].text, r.choices[0].finish_reason
            assert r.model_extra["mtpdraft"]["token_ids"] == stopper.ids
        assert text == cut and fr == "stop"


def test_seed_reproducible(srv):
    c = srv.client()

    def sample(seed):
        return c.completions.create(model="tiny-chat", prompt="sample me", max_tokens=30, temperature=0.9,
                                    top_p=0.95, seed=seed).model_extra["mtpdraft"]["token_ids"]

    a, b, other = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != other


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": "x", "max_tokens": 4}).encode(), "missing model"),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": "four"}, None),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": 4, "bogus": 1}, None),
    ({"model": "tiny-chat", "prompt": "", "max_tokens": 4}, None),
    ({"model": "tiny-chat", "prompt": [], "max_tokens": 4}, None),
    ({"model": "tiny-chat", "prompt": "x" * (CTX * 2), "max_tokens": 4}, None),
    ({"model": "tiny-chat", "prompt": "x" * 100000, "max_tokens": 4}, None),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": CTX}, None),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, None),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": -3}, None),
    ({"model": "tiny-chat", "prompt": "x", "temperature": -1}, None),
    ({"model": "tiny-chat", "prompt": "x", "temperature": "hot"}, None),
    ({"model": "tiny-chat", "prompt": "x", "top_p": 0}, None),
    ({"model": "tiny-chat", "prompt": "x", "top_p": 1.5}, None),
    ({"model": "tiny-chat", "prompt": "x", "n": 2}, None),
    ({"model": "tiny-chat", "prompt": "x", "stop": [""]}, None),
    ({"model": "tiny-chat", "prompt": "x", "stop": 5}, None),
    ({"model": "tiny-chat", "prompt": "x", "stream": "yes"}, None),
    ({"model": "tiny-chat", "prompt": "x", "draft_len": 0}, None),
    ({"model": "tiny-chat", "prompt": "x", "draft_len": 1000}, None),
    ({"model": "tiny-chat", "prompt": "x", "speculative": "maybe"}, None),
    ({"model": "tiny-chat", "prompt": [10 ** 9]}, None),
    ({"model": "tiny-chat", "prompt": ["a", "b"]}, None),
    ({"model": "tiny-chat", "prompt": "x", "seed": -1}, None),
    ({"model": "tiny-chat", "prompt": "x", "presence_penalty": 1.0}, None),
    ({"model": "nope", "prompt": "x"}, 404),
]
BAD_CHAT = [
    {"model": "tiny-chat", "messages": []},
    {"model": "tiny-chat", "messages": "hi"},
    {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "tiny-chat", "messages": [{"role": "user"}], "max_tokens": 4},  # encodes fine; see below
    {"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CTX * 4},
    {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
]


def _check_error(r, want=None):
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if want:
        assert r.status_code == want
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]


def test_malformed_requests(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for body, want in BAD:
            if isinstance(body, bytes):
                r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            else:
                r = h.post("/v1/completions", json=body)
            _check_error(r, want if isinstance(want, int) else None)
        for body in BAD_CHAT:
            r = h.post("/v1/chat/completions", json=body)
            if body["messages"] == [{"role": "user"}]:  # content may be omitted: a valid (empty) turn
                assert r.status_code == 200
                continue
            _check_error(r, 404 if body["model"] == "nope" else None)
        r = h.post("/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
        _check_error(r, 413)
        _check_error(h.get("/v1/nothing"), 404)
    # the openai client surfaces these as typed errors
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model="tiny-chat", prompt="x", max_tokens=2, n=3)
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_load_disconnects_and_metrics(srv):
    """Concurrent streaming clients (some hang up early) + malformed requests: no 5xx, no stuck rows,
    token counters agree with what the clients received."""
    srv.wait_idle()
    m0 = srv.metrics()
    statuses: list[int] = []

    async def full_client(h, i):
        body = {"model": "tiny-chat", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 20 + (i * 7) % 40,
                "temperature": 0 if i % 2 else 0.8, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}, "draft_len": 1 + i % 6}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            statuses.append(r.status_code)
            usage, ids, done = None, None, False
            async for line in r.aiter_lines():
                if not line:
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                d = json.loads(data)
                usage = d.get("usage") or usage
                if "mtpdraft" in d:
                    ids = d["mtpdraft"]["token_ids"]
            assert done and usage["completion_tokens"] == len(ids)
            return usage["completion_tokens"]

    async def quitter(h, i):
        body = {"model": "tiny-chat", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": CTX - 40,
                "stream": True, "ignore_eos": True, "temperature": 0.5}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            statuses.append(r.status_code)
            n = 0
            async for line in r.aiter_lines():
                n += bool(line)
                if n >= 2:
                    break  # hang up mid-stream

    async def bad(h, i):
        r = await h.post("/v1/completions", content=b'{"model": "tiny-chat", "prompt": ' + str(i).encode(),
                         headers={"content-type": "application/json"})
        statuses.append(r.status_code)
        r = await h.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": [{"role": 1}]})
        statuses.append(r.status_code)

    async def phase(coros):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as h:
            return await asyncio.gather(*[c(h, i) for i, c in enumerate(coros)])

    # phase 1: complete clients only -> exact token accounting
    got = asyncio.run(phase([full_client] * 16))
    srv.wait_idle()
    m1 = srv.metrics()
    key = 'mtpdraft_finished_generation_tokens_total{status="ok"}'
    assert m1[key] - m0[key] == sum(got)
    assert m1["mtpdraft_generation_tokens_total"] - m0["mtpdraft_generation_tokens_total"] == sum(got)
    assert m1['mtpdraft_requests_total{status="ok"}'] - m0['mtpdraft_requests_total{status="ok"}'] == 16

    # phase 2: mixed, with hang-ups and garbage
    t0 = time.monotonic()
    asyncio.run(phase([full_client, quitter, bad, full_client] * 6))
    h = srv.wait_idle()
    assert h["status"] == "ok" and h["active_rows"] == 0
    assert time.monotonic() - t0 < 60
    m2 = srv.metrics()
    assert m2["mtpdraft_active_rows"] == 0 and m2["mtpdraft_worker_alive"] == 1
    assert m2['mtpdraft_requests_total{status="cancelled"}'] - m1['mtpdraft_requests_total{status="cancelled"}'] >= 1
    assert m2['mtpdraft_requests_total{status="error"}'] == 0
    assert all(s < 500 for s in statuses), statuses
    assert not any(k.startswith('mtpdraft_http_responses_total{code="5') for k in m2)
    # quitters were cut off long before their max_tokens: their rows were freed, not run to the end
    cancelled_tokens = m2['mtpdraft_finished_generation_tokens_total{status="cancelled"}'] - \
        m1['mtpdraft_finished_generation_tokens_total{status="cancelled"}']
    assert cancelled_tokens < 6 * (CTX - 40 - 8)


def test_no_template_queue_full_and_shutdown(dirs):
    s = Server(dirs[0], max_batch=1, max_queue=1, shutdown_timeout=1.0)
    try:
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["tiny-gemma"]
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-gemma", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.body["code"] == "no_chat_template"

        async def burst():
            body = {"model": "tiny-gemma", "prompt": "long", "max_tokens": CTX - 20, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as h:
                rs = await asyncio.gather(*[h.post("/v1/completions", json=body) for _ in range(6)])
            return [r.status_code for r in rs], [r.json() for r in rs]

        codes, bodies = asyncio.run(burst())
        assert 429 in codes and set(codes) <= {200, 429}, codes
        assert all(b["error"]["code"] == "queue_full" for code, b in zip(codes, bodies) if code == 429)
        s.wait_idle()

        # graceful shutdown with a stream in flight: the client gets a clean end, the worker stops
        got: list[str] = []

        def reader():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                              json={"model": "tiny-gemma", "prompt": "zz", "max_tokens": CTX - 10, "stream": True,
                                    "ignore_eos": True}) as r:
                try:
                    for line in r.iter_lines():
                        if line:
                            got.append(line)
                except httpx.HTTPError:
                    got.append("<cut>")

        t = threading.Thread(target=reader)
        t.start()
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got
    finally:
        t0 = time.monotonic()
        s.stop()
    assert not s.thread.is_alive() and time.monotonic() - t0 < 15
    t.join(timeout=10)
    assert not t.is_alive()
    assert not s.engine.alive and s.engine.num_active == 0
