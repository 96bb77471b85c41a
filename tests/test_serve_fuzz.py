"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
valid and invalid requests alike never get a 5xx, never hang, and every error is an
OpenAI-shaped error body."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from test_serve import TEMPLATE, Server  # noqa: E402

from mtpdraft.testing import tiny_model_dir  # noqa: E402

# examples per (operation, mode): the generating endpoints get most of them
EXAMPLES = {"POST": 60, "GET": 8}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("fuzz") / "tiny-fuzz", "gemma3_text")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    # a short context bounds the work of any one request (n choices x max_tokens)
    s = Server(d, max_context=48, max_batch=8, max_queue=8, default_max_tokens=8)
    yield s
    s.stop()


def test_api_never_5xx(fuzz_server):
    # Cases are drawn from the operations' strategies directly: schemathesis' pytest
    # plugin (schema.parametrize / from_fixture) does not run under pytest 9.
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in ops} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    seen = []
    for op in ops:
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.method.upper() == "POST" else \
            (GenerationMode.POSITIVE,)  # the GETs' parameters are free-form strings: nothing to get wrong
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES[op.method.upper()], deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                    case.body["model"] = "tiny-fuzz"  # else nearly every request is a 404
                r = case.call(base_url=fuzz_server.url, timeout=30)  # a hang fails as a timeout
                seen.append((case.method, r.status_code))
                assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])
                if r.status_code >= 400 and case.path.startswith("/v1/"):
                    e = r.json()["error"]
                    assert set(e) == {"message", "type", "param", "code"} and e["message"]
                if r.status_code == 200 and r.text.startswith("data: "):  # a stream: ends cleanly, no error event
                    events = [ln for ln in r.text.split("\n") if ln]
                    assert events[-1] == "data: [DONE]" and not any(ln.startswith('data: {"error"') for ln in events)

            check()
    assert ("POST", 200) in seen and any(m == "POST" and s >= 400 for m, s in seen)  # both kinds were tried
    fuzz_server.wait_idle()
