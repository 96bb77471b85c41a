"""The OpenAI-compatible server: real uvicorn on 127.0.0.1, tiny random models, the official client."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

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
        self.app, self.engine = build_app(str(model_dir), **{"drafter": "ngram", "dtype": "fp32", "max_context": CTX,
                                                             "spec_off_batch": 0, **kw})
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


def test_speculative_flag_says_whether_the_request_drafted(srv, dirs, monkeypatch):
    """The response extension's `speculative`: true when the request had a drafter; false when
    it asked for none, and where `auto` drafts nothing at its temperature (SmolLM2's shipped
    choice when sampling), although the server runs with a drafter."""
    import mtpdraft.serve.engine as E
    from mtpdraft.drafters import ByTemperature, NgramDrafter

    c = srv.client()
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    assert r.model_extra["mtpdraft"]["speculative"] is True
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                             extra_body={"speculative": False})
    assert r.model_extra["mtpdraft"]["speculative"] is False
    monkeypatch.setattr(E, "drafter_factory", lambda *a, **kw: lambda: ByTemperature(NgramDrafter(), None))
    s = Server(dirs[1], max_batch=2)
    try:
        c = s.client()
        r = c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                 extra_body={"ignore_eos": True})
        ext = r.model_extra["mtpdraft"]
        assert ext["speculative"] is True and sum(ext["proposed_by_position"]) > 0
        r = c.completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=20, temperature=0.8, seed=4)
        ext = r.model_extra["mtpdraft"]
        assert ext["speculative"] is False and ext["proposed_by_position"] == []
    finally:
        s.stop()


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


@pytest.mark.parametrize("kind", ["mtp", "ngram", "datastore"])
def test_batched_adaptive_server_equals_generate(dirs, tmp_path, kind, monkeypatch):
    """Greedy requests batched together with an MTP (or n-gram, or datastore) drafter and
    adaptive draft length: each returns what generate() gives with the same drafter and
    policy, and what plain decoding gives. The drafter's weights load once, at startup."""
    from mtpdraft.drafters import Datastore, MTPConfig, MTPDrafter

    model, tok = load(str(dirs[0]), "fp32")
    spec = kind
    if kind == "mtp":
        spec = str(MTPDrafter.random(MTPConfig.for_target(model), seed=1, std=0.3).save(tmp_path / "mtp"))
    if kind == "datastore":  # the model's own continuations of the first two prompts
        outs = [list(generate(model, tok(p).input_ids, SamplingParams(max_new_tokens=40), tokenizer=tok, max_len=CTX))
                for p in PROMPTS[:2]]
        spec = str(Datastore.from_sequences(outs, model.vocab_size).save(tmp_path / "store.safetensors"))
    loads = []
    load_drafter = MTPDrafter.load.__func__
    monkeypatch.setattr(MTPDrafter, "load",
                        classmethod(lambda cls, *a, **kw: loads.append(a) or load_drafter(cls, *a, **kw)))
    s = Server(dirs[0], drafter=spec, adaptive=True, draft_len=5, max_batch=4)
    try:
        c = s.client()

        def one(p):
            r = c.completions.create(model="tiny-gemma", prompt=p, max_tokens=40, temperature=0)
            return p, r.model_extra["mtpdraft"]

        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, PROMPTS[:4]))
    finally:
        s.stop()
    assert len(loads) == (kind == "mtp")  # not once a request
    proposed, stored = 0, 0
    for p, ext in results:
        ids, sp = tok(p).input_ids, SamplingParams(max_new_tokens=40)
        drafter = make_drafter(spec, model)
        want = list(generate(model, ids, sp, drafter=drafter, spec=SpecParams(5, adaptive=True),
                             tokenizer=tok, max_len=CTX))
        assert ext["token_ids"] == want
        assert want == list(generate(model, ids, sp, tokenizer=tok, max_len=CTX))
        proposed += sum(ext["proposed_by_position"])
        stored += getattr(drafter, "rounds", {}).get("datastore", 0)
    assert proposed > 0  # the drafter really drafted
    assert stored > 0 or kind != "datastore"  # and the store proposed, not prompt lookup alone


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
    ({"model": "tiny-chat", "prompt": "x", "n": 0}, None),
    ({"model": "tiny-chat", "prompt": "x", "n": 1000}, None),
    ({"model": "tiny-chat", "prompt": ["x"] * 40, "n": 2}, None),
    ({"model": "tiny-chat", "prompt": "x", "best_of": 2}, None),
    ({"model": "tiny-chat", "prompt": "x", "suffix": "y"}, None),
    ({"model": "tiny-chat", "prompt": "x", "logprobs": 21}, None),
    ({"model": "tiny-chat", "prompt": "x", "logprobs": -1}, None),
    ({"model": "tiny-chat", "prompt": "x", "stream_options": {"include_usage": True}}, None),
    ({"model": "tiny-chat", "prompt": "x", "logit_bias": {"abc": 1.0}}, None),
    ({"model": "tiny-chat", "prompt": "x", "logit_bias": {"100000": 1.0}}, None),
    ({"model": "tiny-chat", "prompt": "x", "logit_bias": {"5": 101}}, None),
    ({"model": "tiny-chat", "prompt": "x", "frequency_penalty": -2.5}, None),
    (b'{"model": "tiny-chat", "prompt": "lone \\ud800 surrogate"}', None),
    ({"model": "tiny-chat", "prompt": [[1, 2], []]}, None),
    ({"model": "tiny-chat", "prompt": "x", "stop": [""]}, None),
    ({"model": "tiny-chat", "prompt": "x", "stop": 5}, None),
    ({"model": "tiny-chat", "prompt": "x", "stream": "yes"}, None),
    ({"model": "tiny-chat", "prompt": "x", "draft_len": 0}, None),
    ({"model": "tiny-chat", "prompt": "x", "draft_len": 1000}, None),
    ({"model": "tiny-chat", "prompt": "x", "speculative": "maybe"}, None),
    ({"model": "tiny-chat", "prompt": [10 ** 9]}, None),
    ({"model": "tiny-chat", "prompt": ["a", 5]}, None),
    ({"model": "tiny-chat", "prompt": "x", "seed": -1}, None),
    ({"model": "tiny-chat", "prompt": "x", "presence_penalty": 2.5}, None),
    ({"model": "nope", "prompt": "x"}, 404),
]
BAD_CHAT = [
    {"model": "tiny-chat", "messages": []},
    {"model": "tiny-chat", "messages": "hi"},
    {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "tiny-chat", "messages": [{"role": "user"}], "max_tokens": 4},  # encodes fine; see below
    {"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CTX * 4},
    {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
    {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "tools": []},
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
        srv.client().completions.create(model="tiny-chat", prompt="x", max_tokens=2, best_of=3)
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


# -- issue 13: stops while streaming, OpenAI fields, failures and disconnects ------------------
def _stream_completion(c, **kw):
    parts = list(c.completions.create(model="tiny-chat", stream=True, **kw))
    return "".join(p.choices[0].text for p in parts if p.choices), parts[-1].choices[0].finish_reason


def test_stream_never_sends_what_the_response_cuts(srv, ref):
    """Every stop shape: streamed text == non-streamed text == generate()'s StopChecker text."""
    c = srv.client()
    prompt, n = "abc abc abc abc", 60
    kw = dict(prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(model="tiny-chat", **kw).choices[0].text
    printable = [i for i in range(1, len(full) - 3) if all(32 <= ord(ch) < 127 for ch in full[i:i + 3])]
    i, j = printable[0], printable[len(printable) // 2]
    shapes = [[full[i]], [full[i:i + 2]], [full[0]], [full[i] + "\x01"], [full[j:j + 3], full[i + 1]],
              [full[i:i + 2], full[i + 1:i + 3]], ["never-seen"], [full[i:] + "more"]]
    model, tok = ref.model, ref.tok
    for stop in shapes:
        sp = SamplingParams(max_new_tokens=n, temperature=0.0, stop=tuple(stop), ignore_eos=True)
        stopper = StopChecker(sp, eos_ids_of(model, tok), tok)
        list(generate(model, tok(prompt).input_ids, sp, tokenizer=tok, stopper=stopper, max_len=CTX))
        r = c.completions.create(model="tiny-chat", stop=stop, **kw)
        streamed, fr = _stream_completion(c, stop=stop, **kw)
        assert r.choices[0].text == streamed == stopper.text(), stop
        assert r.choices[0].finish_reason == fr == ("stop" if stopper.reason == "stop" else "length")
    # chat streams hold back the same way
    msgs = [{"role": "user", "content": "count: 1. 2. 3."}]
    whole = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    stop = [text[len(text) // 2]] if text else ["x"]
    r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=40, temperature=0, stop=stop)
    chunks = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content


def test_tiny_temperature_is_greedy(srv, ref):
    c = srv.client()
    p = PROMPTS[0]
    for t in (1e-40, 1e-300):
        r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=20, temperature=t)
        assert r.model_extra["mtpdraft"]["token_ids"] == ref(ref.tok(p).input_ids, 20)


def target_logprobs(ref, prompt_ids, gen_ids):
    """The target's log-softmax over prompt + generated in one forward: [len - 1, V]."""
    seq = prompt_ids + gen_ids
    out = ref.model(torch.tensor([seq[:-1]]), ref.model.new_cache(1, CTX), logits="all")
    return torch.log_softmax(out.logits[0].float(), -1)


def test_logprobs_are_the_targets_log_softmax(srv, ref):
    c = srv.client()
    p = PROMPTS[2]
    ids = ref.tok(p).input_ids
    for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 5, "top_k": 20}):
        r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=24, logprobs=3,
                                 extra_body={"ignore_eos": True, **{k: v for k, v in kw.items() if k == "top_k"}},
                                 **{k: v for k, v in kw.items() if k != "top_k"})
        gen = r.model_extra["mtpdraft"]["token_ids"]
        lp = target_logprobs(ref, ids, gen)[len(ids) - 1:]
        got = r.choices[0].logprobs
        assert got.token_logprobs == pytest.approx([lp[j, t].item() for j, t in enumerate(gen)], abs=1e-4)
        assert got.tokens == [ref.tok.decode([t]) for t in gen]
        best = lp.topk(3, -1)
        for j, top in enumerate(got.top_logprobs):
            assert sorted(top.values(), reverse=True) == pytest.approx(best.values[j].tolist(), abs=1e-4) or \
                len(top) < 3  # two ids may decode to the same string
        assert got.text_offset == [sum(len(s) for s in got.tokens[:j]) for j in range(len(gen))]
        if kw["temperature"] == 0:
            assert got.token_logprobs == pytest.approx(best.values[:, 0].tolist(), abs=1e-4)

    # chat: logprobs + top_logprobs, streamed and not
    msgs = [{"role": "user", "content": "hi there hi there"}]
    rendered = "<|user|>hi there hi there\n<|assistant|>"
    ids = ref.tok(rendered, add_special_tokens=False).input_ids
    r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=16, temperature=0, logprobs=True,
                                  top_logprobs=2)
    gen = r.model_extra["mtpdraft"]["token_ids"]
    lp = target_logprobs(ref, ids, gen)[len(ids) - 1:]
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([lp[j, t].item() for j, t in enumerate(gen)], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
               for e in content)
    assert content[0].bytes == list(content[0].token.encode())
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=16, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_echo_and_prompt_logprobs(srv, ref):
    c = srv.client()
    p = PROMPTS[0]
    ids = ref.tok(p).input_ids
    plain = c.completions.create(model="tiny-chat", prompt=p, max_tokens=8, temperature=0)
    r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == p + plain.choices[0].text
    r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=8, temperature=0, echo=True, logprobs=1)
    gen = r.model_extra["mtpdraft"]["token_ids"]
    lp = target_logprobs(ref, ids, gen)
    got = r.choices[0].logprobs
    seq = ids + gen
    assert got.tokens == [ref.tok.decode([t]) for t in seq]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert got.token_logprobs[1:] == pytest.approx([lp[j, t].item() for j, t in enumerate(seq[1:])], abs=1e-4)
    assert got.text_offset[len(ids)] == len(p)
    # streamed: the echo (with the prompt's logprobs) comes first; the whole adds up to the same
    parts = list(c.completions.create(model="tiny-chat", prompt=p, max_tokens=8, temperature=0, echo=True,
                                      logprobs=1, stream=True))
    assert "".join(x.choices[0].text for x in parts) == r.choices[0].text
    assert [t for x in parts if x.choices[0].logprobs for t in x.choices[0].logprobs.tokens] == got.tokens
    # token-id prompts echo their decoded text
    r = c.completions.create(model="tiny-chat", prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith(ref.tok.decode(ids))


def test_n_and_prompt_lists(srv, ref):
    c = srv.client()
    ps = [PROMPTS[0], PROMPTS[3]]
    r = c.completions.create(model="tiny-chat", prompt=ps, n=2, max_tokens=15, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for ch in r.choices:
        want = ref(ref.tok(ps[ch.index // 2]).input_ids, 15)
        assert ch.model_extra["mtpdraft"]["token_ids"] == want
        assert ch.text == ref.tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == sum(len(ref.tok(p).input_ids) for p in ps)
    assert r.usage.completion_tokens == sum(len(ch.model_extra["mtpdraft"]["token_ids"]) for ch in r.choices)
    # token-id prompt lists are the same prompts
    r2 = c.completions.create(model="tiny-chat", prompt=[ref.tok(p).input_ids for p in ps], max_tokens=15,
                              temperature=0)
    assert [ch.text for ch in r2.choices] == [r.choices[0].text, r.choices[2].text]
    # sampled: choice j uses seed + j, so choice 0 is the single request's sample
    kw = dict(model="tiny-chat", prompt="sample me", max_tokens=20, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    many = c.completions.create(n=3, **kw)
    one = c.completions.create(**kw)
    assert many.choices[0].text == one.choices[0].text
    assert len({ch.text for ch in many.choices}) > 1
    # chat, streamed: deltas per index add up to the non-streamed choices; usage counts all of them
    msgs = [{"role": "user", "content": "be brief"}]
    full = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0.8, seed=2, n=2)
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0.8, seed=2,
                                            n=2, stream=True, stream_options={"include_usage": True}))
    texts = ["", ""]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [ch.message.content for ch in full.choices]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_penalties_and_logit_bias(srv, ref):
    c = srv.client()
    p = PROMPTS[1]
    ids = ref.tok(p).input_ids
    pen = {"presence_penalty": 0.8, "frequency_penalty": 0.5}
    want = ref(ids, 30, ignore_eos=True, **pen)
    assert want != ref(ids, 30, ignore_eos=True)
    for spec in (True, False):
        r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=30, temperature=0, **pen,
                                 extra_body={"ignore_eos": True, "speculative": spec})
        assert r.model_extra["mtpdraft"]["token_ids"] == want
    r = c.completions.create(model="tiny-chat", prompt=p, max_tokens=6, temperature=0.7, logit_bias={"70": 100})
    assert r.model_extra["mtpdraft"]["token_ids"] == [70] * 6


def test_chunked_body_limit(srv):
    def body(pad):
        yield b'{"model": "tiny-chat", "prompt": "x", "max_tokens": 2'
        for _ in range(pad // 65536):
            yield b" " * 65536
        yield b"}"

    with httpx.Client(base_url=srv.url, timeout=30) as h:
        r = h.post("/v1/completions", content=body(1 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 200
        try:
            r = h.post("/v1/completions", content=body(6 << 20), headers={"content-type": "application/json"})
        except httpx.HTTPError:  # the server may answer 413 and close before the upload ends
            return
        _check_error(r, 413)
        assert r.json()["error"]["code"] == "body_too_large"


@pytest.fixture(scope="module")
def slow_srv(dirs):
    """A server whose every forward takes 10 ms longer: requests are still running when
    the test acts on them."""
    s = Server(dirs[0], max_batch=8, max_queue=16)
    forward = s.engine.model.forward

    def slow(*a, **kw):
        time.sleep(0.01)
        return forward(*a, **kw)

    s.engine.model.forward = slow
    yield s
    s.stop()


def test_disconnects_free_their_rows(slow_srv):
    s = slow_srv
    n = CTX - 10  # ~4 s of decoding: far longer than the test waits
    key = 'mtpdraft_finished_generation_tokens_total{status="cancelled"}'
    for stream in (False, True):
        s.wait_idle()
        m0 = s.metrics()
        body = {"model": "tiny-gemma", "prompt": "abc", "max_tokens": n, "ignore_eos": True, "temperature": 0.7,
                "speculative": False, "stream": stream}
        with httpx.Client(base_url=s.url, timeout=httpx.Timeout(30, read=0.3)) as h:
            if stream:
                with h.stream("POST", "/v1/completions", json=body) as r:
                    for i, _ in enumerate(r.iter_lines()):
                        if i >= 2:
                            break
            else:
                with pytest.raises(httpx.ReadTimeout):
                    h.post("/v1/completions", json=body)
        s.wait_idle(timeout=1.0)  # the row is freed within a second of the disconnect
        m1 = s.metrics()
        assert m1['mtpdraft_requests_total{status="cancelled"}'] - m0['mtpdraft_requests_total{status="cancelled"}'] == 1
        assert m1[key] - m0[key] < n // 2


def test_a_failing_row_fails_alone(slow_srv, ref, monkeypatch):
    """One row fails in verification, another makes the batched forward raise: both get a
    500, their batch-mates finish with exactly their single-request tokens."""
    import mtpdraft.decoding.step as engine_mod

    s = slow_srv
    verify, forward = engine_mod.verify, s.engine.model.forward
    calls = collections.Counter()

    def bad_verify(draft, draft_probs, logits, sp, gen=None, **kw):
        if sp.seed == 4242:  # the prefill's and two cycles' verifications pass
            calls[id(sp)] += 1
            if calls[id(sp)] > 3:
                raise RuntimeError("injected verification failure")
        return verify(draft, draft_probs, logits, sp, gen, **kw)

    def bad_forward(tokens, cache, logits="all"):
        if any(n >= 150 for n in cache.lengths):
            raise RuntimeError("injected forward failure")
        return forward(tokens, cache, logits)

    monkeypatch.setattr(engine_mod, "verify", bad_verify)
    monkeypatch.setattr(s.engine.model, "forward", bad_forward)
    s.wait_idle()

    def post(body):
        with httpx.Client(base_url=s.url, timeout=60) as h:
            return h.post("/v1/completions", json={"model": "tiny-gemma", "max_tokens": 60, "temperature": 0,
                                                   "ignore_eos": True, **body})

    with ThreadPoolExecutor(4) as ex:
        good = [ex.submit(post, {"prompt": p}) for p in PROMPTS[:2]]
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["active_rows"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        bad = [ex.submit(post, {"prompt": "x" * 160, "max_tokens": 10}),
               ex.submit(post, {"prompt": "y", "seed": 4242})]
        for f in bad:
            r = f.result()
            assert r.status_code == 500 and r.json()["error"]["code"] == "decode_failed"
        for f, p in zip(good, PROMPTS[:2]):
            r = f.result()
            assert r.status_code == 200
            assert r.json()["mtpdraft"]["token_ids"] == ref(ref.tok(p).input_ids, 60, ignore_eos=True)
    assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_the_engine_thread_loads_and_runs_the_model(dirs, monkeypatch, tmp_path):
    """build_app loads the model on the engine's own thread (one OpenMP pool: BatchEngine.launch),
    runs the drafter's setup there too, and raises a load or settings error to its caller."""
    import mtpdraft
    import mtpdraft.serve.engine as E

    threads = {}
    real_load, real_factory = mtpdraft.load, E.drafter_factory

    def load(*a, **kw):
        threads["load"] = threading.current_thread()
        return real_load(*a, **kw)

    def factory(*a, **kw):
        threads["drafter"] = threading.current_thread()
        return real_factory(*a, **kw)

    def step(self, *a, **kw):
        threads.setdefault("steps", set()).add(threading.current_thread())
        return real_step(self, *a, **kw)

    real_step = E.Batch.step
    monkeypatch.setattr(mtpdraft, "load", load)
    monkeypatch.setattr(E, "drafter_factory", factory)
    monkeypatch.setattr(E.Batch, "step", step)
    s = Server(dirs[0], max_batch=2)
    try:
        r = s.client().completions.create(model="tiny-gemma", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
        assert threads["load"] is threads["drafter"] is s.engine._thread is not threading.current_thread()
        assert threads["steps"] == {s.engine._thread}  # every decoding step on that thread too
        assert s.engine.alive
    finally:
        s.stop()
    assert not s.engine.alive
    with pytest.raises(RuntimeError, match="has stopped"):  # a stopped engine says so instead of half-starting
        s.engine.start()
    assert not s.engine.alive
    from mtpdraft.serve import build_app

    with pytest.raises(ValueError, match="max_context"):
        build_app(str(dirs[0]), dtype="fp32", max_context=10**9)
    with pytest.raises(ValueError, match="unknown drafter"):
        build_app(str(dirs[0]), dtype="fp32", max_context=256, drafter=str(tmp_path / "missing"))
