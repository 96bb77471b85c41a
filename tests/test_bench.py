"""The bench harness: prompt files, statistics arithmetic, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from mtpdraft.bench import (PromptFileError, PromptRecord, RunStats, combine, default_prompts_path, load_prompts,
                            merge_acceptance, per_category, speedup, summarize, tokens_per_s)
from mtpdraft.bench.runner import parse_compare


def _write(tmp_path, text: str):
    p = tmp_path / "prompts.jsonl"
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- prompt files

def test_good_prompt_lines(tmp_path):
    p = _write(tmp_path, "\n".join([
        '{"prompt": "Hello there", "category": "writing", "id": "w1"}',
        "",
        '{"turns": ["first", "second"], "question_id": 81, "category": "multi_turn"}',
        '{"prompt": "no id or category"}',
        "   ",
    ]) + "\n")
    ps = load_prompts(p)
    assert [x.id for x in ps] == ["w1", "81", "line4"]
    assert ps[0].turns == ("Hello there",) and ps[0].category == "writing" and not ps[0].multi_turn
    assert ps[1].turns == ("first", "second") and ps[1].category == "multi_turn" and ps[1].multi_turn
    assert ps[2].category == "uncategorized" and ps[2].line == 4
    assert [x.id for x in load_prompts(p, limit=2)] == ["w1", "81"]


@pytest.mark.parametrize("lines, lineno, words", [
    (['{"prompt": "ok"}', '{"prompt": "unterminated'], 2, "invalid JSON"),
    (['{"prompt": "ok"}', '{"category": "x"}'], 2, "missing 'prompt'"),
    (['["prompt", "x"]'], 1, "JSON object"),
    (['{"prompt": 3}'], 1, "'prompt' must be a non-empty string"),
    (['{"prompt": ""}'], 1, "'prompt' must be a non-empty string"),
    (['{"turns": "just a string"}'], 1, "'turns' must be a non-empty list"),
    (['{"turns": []}'], 1, "'turns' must be a non-empty list"),
    (['{"prompt": "a"}', '', '{"turns": ["a", 2]}'], 3, "'turns'[1]"),
    (['{"prompt": "a", "turns": ["b"]}'], 1, "not both"),
    (['{"prompt": "a", "category": 5}'], 1, "'category'"),
    (['{"prompt": "a", "id": [1]}'], 1, "id"),
    (['{"prompt": "a", "id": true}'], 1, "id"),
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], 2, "duplicate id"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, lines, lineno, words):
    p = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(p)
    assert f"line {lineno}:" in str(e.value) and words in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_prompt_file(tmp_path, text):
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(_write(tmp_path, text))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.jsonl")


def test_shipped_prompt_set():
    ps = load_prompts(default_prompts_path())
    cats = {p.category for p in ps}
    assert 24 <= len(ps) <= 40
    assert {"writing", "code", "qa", "math", "summarization", "extraction", "lists", "translation",
            "multi_turn"} <= cats
    assert any(p.multi_turn for p in ps)
    # categories rotate, so --limit N still covers several of them
    assert len({p.category for p in ps[:6]}) == 6


def test_parse_compare():
    assert parse_compare("hf,llamacpp") == ["hf", "llamacpp"]
    assert parse_compare("") == [] and parse_compare(None) == []
    with pytest.raises(ValueError, match="unknown --compare"):
        parse_compare("hf,vllm")


# ---------------------------------------------------------------- statistics

def _run(tokens, seconds, cycles=0, proposed=(), accepted=()):
    return RunStats(decode_tokens=tokens, decode_s=seconds, cycles=cycles, tokens=tokens + 1, generations=1,
                    proposed_by_pos=list(proposed), accepted_by_pos=list(accepted))


def test_speedup_and_tokens_per_s():
    assert tokens_per_s(100, 4.0) == 25.0
    assert tokens_per_s(5, 0.0) == 0.0
    assert speedup(50.0, 25.0) == 2.0
    assert speedup(10.0, 0.0) is None


def test_merge_acceptance_ragged():
    proposed, accepted = merge_acceptance([([4, 2], [3, 1]), ([6, 5, 2], [3, 2, 0]), ([], [])])
    assert proposed == [10, 7, 2] and accepted == [6, 3, 0]
    with pytest.raises(ValueError):
        merge_acceptance([([1, 1], [1])])
    with pytest.raises(ValueError):
        merge_acceptance([([1], [2])])


def test_combine_sums_counts_not_rates():
    c = combine([_run(30, 1.0, 10, [10, 8], [8, 4]), _run(10, 1.0, 10, [10], [0])])
    assert c.decode_tokens == 40 and c.decode_s == 2.0 and c.cycles == 20 and c.generations == 2
    assert c.tokens_per_s == 20.0
    assert c.mean_accepted_tokens == 2.0
    assert c.acceptance_by_position == [0.4, 0.5]


def test_per_category_and_summary():
    recs = [
        # category x: plain 100 tok in 10 s + 50 tok in 5 s = 10 tok/s; spec 150 tok in 5 s = 30 tok/s
        PromptRecord("1", "x", _run(100, 10.0, 100), _run(100, 3.0, 40, [40, 30], [30, 20]), True),
        PromptRecord("2", "x", _run(50, 5.0, 50), _run(50, 2.0, 20, [20, 20], [20, 10]), True),
        # category y: plain 40 tok/s; spec 60 tok/s
        PromptRecord("3", "y", _run(80, 2.0, 80), _run(60, 1.0, 60, [60], [0]), False),
    ]
    cats = per_category(recs)
    assert list(cats) == ["x", "y"]
    assert cats["x"]["speedup"] == 3.0 and cats["x"]["num_prompts"] == 2
    assert cats["x"]["mean_accepted_tokens"] == 150 / 60
    assert cats["x"]["acceptance_by_position"] == [50 / 60, 30 / 50]
    assert cats["y"]["speedup"] == 1.5 and cats["y"]["mean_accepted_tokens"] == 1.0
    s = summarize(recs)
    assert s["num_prompts"] == 3
    assert s["baseline"]["total_tokens"] == 230 and s["baseline"]["total_s"] == 17.0
    assert s["baseline"]["tokens_per_s"] == 230 / 17.0
    assert s["speculative"]["total_tokens"] == 210 and s["speculative"]["total_s"] == 6.0
    assert s["speculative"]["tokens_per_s"] == 35.0
    assert s["speedup"] == 35.0 / (230 / 17.0)
    assert s["speculative"]["mean_accepted_tokens"] == 210 / 120
    assert s["speculative"]["acceptance_by_position"] == [50 / 120, 30 / 50]
    assert s["identical_outputs"] == {"matched": 2, "total": 3, "mismatched_ids": ["3"]}


# ---------------------------------------------------------------- end to end

REQUIRED = {"model", "drafter", "dtype", "num_prompts", "max_new_tokens", "temperature", "baseline", "speculative",
            "speedup", "identical_outputs", "per_category", "machine"}


def test_tiny_bench_end_to_end(tmp_path):
    from mtpdraft.cli import main
    from mtpdraft.testing import tiny_model_dir

    model = tiny_model_dir(tmp_path / "tiny")
    prompts = _write(tmp_path, "\n".join([
        '{"id": "rep", "category": "copy", "prompt": "abc abc abc abc abc"}',
        '{"question_id": 7, "category": "chat", "turns": ["hello there", "and hello again"]}',
        '{"id": "plain", "prompt": "the cat sat on the mat"}',
    ]) + "\n")
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(model), "--drafter", "ngram", "--prompts", str(prompts),
               "--max-new-tokens", "16", "--dtype", "fp32", "--no-progress",
               "--json", str(out / "b.json"), "--report", str(out / "b.md"), "--plot", str(out / "b.png")])
    assert rc == 0
    r = json.loads((out / "b.json").read_text())
    assert REQUIRED <= set(r)
    assert r["drafter"] == "ngram" and r["dtype"] == "fp32" and r["num_prompts"] == 3 and r["max_new_tokens"] == 16
    assert {"tokens_per_s", "total_tokens", "total_s"} <= set(r["baseline"])
    assert {"tokens_per_s", "total_tokens", "total_s", "mean_accepted_tokens",
            "acceptance_by_position"} <= set(r["speculative"])
    assert r["identical_outputs"]["matched"] == r["identical_outputs"]["total"] == 3
    assert set(r["per_category"]) == {"copy", "chat", "uncategorized"}
    for c in r["per_category"].values():
        assert {"speedup", "mean_accepted_tokens", "num_prompts"} <= set(c)
    assert r["per_category"]["copy"]["num_prompts"] == 1
    # same greedy tokens both ways, so both modes decoded the same number of tokens
    assert r["baseline"]["total_tokens"] == r["speculative"]["total_tokens"] > 0
    assert r["baseline"]["generations"] == 4  # the two-turn prompt generates twice
    assert r["speculative"]["mean_accepted_tokens"] >= 1.0
    assert r["speedup"] == pytest.approx(r["speculative"]["tokens_per_s"] / r["baseline"]["tokens_per_s"])
    assert {"cpu", "cores", "torch", "date"} <= set(r["machine"])
    md = (out / "b.md").read_text()
    assert "| copy |" in md and "**overall**" in md
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no length asked and none of auto's: the default
    assert (r["draft_len"], r["requested_draft_len"], r["draft_len_from_auto"]) == (6, None, False)


def test_draft_len_note():
    from mtpdraft.bench.report import _draft_len_note

    assert _draft_len_note({"draft_len": 8, "draft_len_from_auto": True, "requested_draft_len": None}) == \
        " (auto.json's, chosen with its variant)"
    assert _draft_len_note({"draft_len": 8, "draft_len_from_auto": True, "requested_draft_len": 12}) == \
        " (12 asked, capped to auto.json's)"
    assert _draft_len_note({"draft_len": 4, "draft_len_from_auto": False, "requested_draft_len": 4}) == ""
    assert _draft_len_note({"draft_len": 6, "draft_len_from_auto": False, "requested_draft_len": None}) == ""


def test_bad_prompt_file_exits_2(tmp_path, capsys):
    from mtpdraft.cli import main

    p = _write(tmp_path, '{"prompt": "ok"}\n{oops\n')
    assert main(["bench", "--model", str(tmp_path / "unused"), "--prompts", str(p)]) == 2
    assert "line 2" in capsys.readouterr().err


def _fake_result(mismatched):
    recs = [PromptRecord("a", "x", _run(10, 1.0, 10), _run(10, 0.5, 5, [5], [5]), "a" not in mismatched),
            PromptRecord("b", "y", _run(10, 1.0, 10), _run(10, 0.5, 5, [5], [5]), "b" not in mismatched)]
    r = {"model": "m", "drafter": "ngram", "dtype": "fp32", "max_new_tokens": 8, "temperature": 0.0}
    r.update(summarize(recs))
    return r


@pytest.mark.parametrize("allow", [False, True])
def test_mismatch_is_loud_and_fails(monkeypatch, tmp_path, capsys, allow):
    from mtpdraft.cli import main

    monkeypatch.setattr("mtpdraft.bench.runner.run_bench", lambda *a, **k: _fake_result({"b"}))
    rc = main(["bench", "--json", str(tmp_path / "r.json")] + (["--allow-mismatch"] if allow else []))
    err = capsys.readouterr().err
    assert "MISMATCH" in err and "b" in err.split("MISMATCH")[1]
    assert rc == (0 if allow else 1)
    assert json.loads((tmp_path / "r.json").read_text())["identical_outputs"]["matched"] == 1
