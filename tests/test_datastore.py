"""The datastore drafter: its lookup against a brute-force reference, its file, its place in
the combined drafter, and lossless decoding with it on the real bundled SmolLM2."""

import collections
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from mtpdraft.drafters import make_drafter
from mtpdraft.drafters.base import Draft
from mtpdraft.drafters.combined import CombinedDrafter
from mtpdraft.drafters.datastore import MAX_NGRAM, SEP, Datastore, DatastoreDrafter, is_datastore


def reference(flat: list[int], ctx: list[int], k: int, min_match: int, min_share: float):
    """The lookup spelled out: every place of the longest suffix, its continuation walked."""
    for n in range(min(MAX_NGRAM, len(ctx)), min_match - 1, -1):
        gram = ctx[-n:]
        pos = [p + n for p in range(len(flat) - n + 1) if flat[p:p + n] == gram]
        if not pos:
            continue
        assert len(pos) <= 256  # below MAX_MATCHES: every place is walked
        out = []
        for j in range(k):
            nxt = [flat[p + j] if p + j < len(flat) else SEP for p in pos]
            c = collections.Counter(nxt)
            best = min(c, key=lambda t: (-c[t], t))
            if best == SEP or (j > 0 and c[best] < min_share * len(pos)):
                break
            out.append(best)
            pos = [p for p, t in zip(pos, nxt) if t == best]
        return out, n
    return [], 0


def test_lookup_matches_reference():
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(1, 40))] for _ in range(60)]
    store = Datastore.from_sequences(seqs)
    flat = [int(t) for t in store.tokens[:store.size]]
    assert store.size == sum(len(s) + 1 for s in seqs) and store.num_sequences == 60
    found = 0
    for _ in range(3000):
        ctx = [rng.randrange(7) for _ in range(rng.randrange(1, 10))]  # 6: never in the store
        k, mm, share = rng.randrange(1, 7), rng.randrange(1, 4), rng.choice([0.0, 0.5, 0.8])
        got = store.lookup(ctx, k, mm, share)
        assert got == reference(flat, ctx, k, mm, share), (ctx, k, mm, share)
        found += got[1] > 0
    assert 1000 < found < 3000  # both outcomes were exercised


def test_lookup_walks_an_even_spread_of_many_places():
    """Over MAX_MATCHES places, the walk reads an even spread of them in index order (places
    sorted by their next three tokens, then by position): the same draft as the reference
    walking that spread."""
    from mtpdraft.drafters.datastore import MAX_MATCHES

    rng = random.Random(1)
    seqs = [[1, 2] + [rng.randrange(3, 7) for _ in range(4)] for _ in range(1200)]
    store = Datastore.from_sequences(seqs)
    flat = [int(t) for t in store.tokens[:store.size + 8]]
    for ctx, n in (([1, 2], 2), ([9, 1], 1), ([1, 2, 3], 3), ([2, 3, 4, 5], 4)):
        gram = ctx[-n:]
        places = [p for p in range(store.size - n + 1) if flat[p:p + n] == gram]
        places.sort(key=lambda p: (flat[p:p + 3], p))
        m = len(places)
        assert m > MAX_MATCHES or n == 4
        take = min(m, MAX_MATCHES)
        pos = [places[i * m // take] + n for i in range(take)]
        out = []
        for j in range(4):
            nxt = [flat[p + j] for p in pos]
            c = collections.Counter(nxt)
            best = min(c, key=lambda t: (-c[t], t))
            if best == SEP:
                break
            out.append(best)
            pos = [p for p, t in zip(pos, nxt) if t == best]
        assert store.lookup(ctx, 4) == (out, n), ctx


def test_lookup_majority_and_ends():
    store = Datastore.from_sequences([[1, 2, 3, 5, 7]] * 300 + [[1, 2, 4, 6]] * 100 + [[9, 8]])
    assert store.lookup([0, 1, 2], 3) == ([3, 5, 7], 2)  # the most frequent walk over 400 places
    assert store.lookup([1, 2], 8) == ([3, 5, 7], 2)  # it ends where the sequences end
    assert store.lookup([9], 4) == ([8], 1)
    assert store.lookup([5, 9], 4, min_match=2) == ([], 0)
    split = Datastore.from_sequences([[1, 2, 3, 5]] * 6 + [[1, 2, 3, 6]] * 4)
    assert split.lookup([2], 3, min_share=0.0) == ([3, 5], 1)
    assert split.lookup([2], 3, min_share=0.7) == ([3], 1)  # 60% agree on the second token: stop
    assert Datastore.from_sequences([]).lookup([1], 3) == ([], 0)


def test_file_roundtrip_and_errors(tmp_path):
    for top in (50, 65535, 70000):
        store = Datastore.from_sequences([[1, 2, top], [top, 4]], vocab_size=top + 1, model="m")
        path = store.save(tmp_path / f"ds{top}.safetensors")
        back = Datastore.load(path)
        assert is_datastore(path) and (back.vocab_size, back.model) == (top + 1, "m")
        assert np.array_equal(back.tokens, store.tokens) and back.lookup([1, 2], 2) == ([top], 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ds{t}.safetensors" for t in (50, 65535, 70000)]
    with pytest.raises(ValueError, match=r"datastore of a 70001-token vocabulary \(written for m\); tgt has 9"):
        back.check_target(type("T", (), {"vocab_size": 9, "name": "tgt"})())
    back.check_target(type("T", (), {"vocab_size": 70001, "name": "tgt"})())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Datastore.from_sequences([[5, 10]], vocab_size=8)
    with pytest.raises(ValueError, match="token ids must be"):
        Datastore(np.array([1, 2 ** 21]))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert not is_datastore(bad)
    with pytest.raises(ValueError, match="unreadable datastore"):
        Datastore.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"tokens": torch.zeros(3, dtype=torch.int32)}, str(other))
    with pytest.raises(ValueError, match="not an mtpdraft datastore"):
        Datastore.load(other)
    with pytest.raises(FileNotFoundError):
        Datastore.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="min_share"):
        DatastoreDrafter(store, min_share=1.5)


def test_from_run_and_texts(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [dict(source="qa-1:greedy", tokens=list(range(20)), prompt_len=12),
            dict(source="val/qa-2:greedy", tokens=[7] * 9, prompt_len=3),
            dict(source="file:0", tokens=[8] * 9, prompt_len=1)]
    seq_file = tmp_path / "data" / "sequences.jsonl"
    seq_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = Datastore.from_run(tmp_path)
    # 8 prompt tokens kept; the validation prompts' sequences and a --data file's text left out
    assert list(store.tokens[:store.size]) == list(range(4, 20)) + [SEP]
    with pytest.raises(FileNotFoundError, match="no training data"):
        Datastore.from_run(tmp_path / "nothing")
    seq_file.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(ValueError, match="no sequence the target wrote"):
        Datastore.from_run(tmp_path)
    seq_file.write_text('{"source": "qa-1:greedy"}\n')
    with pytest.raises(ValueError, match=r"sequences.jsonl:1: not a training sequence"):
        Datastore.from_run(tmp_path)

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "abcabc"}\n\n{"text": "xy"}\n')
    store = Datastore.from_texts(texts, Tok())
    assert store.lookup([ord("a")], 2) == ([ord("b"), ord("c")], 1) and store.num_sequences == 2
    texts.write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(ValueError, match=r"texts.jsonl line 2: expected an object with a non-empty \"text\""):
        Datastore.from_texts(texts, Tok())


class Recorder:
    """A stand-in MTP drafter that proposes fixed tokens and counts its calls."""

    def __init__(self):
        self.calls = 0

    def propose(self, ctx, k):
        self.calls += 1
        return Draft([42] * k)

    def observe(self, accepted, proposed):
        pass


def test_combined_order_lookup_store_mtp():
    store = DatastoreDrafter(Datastore.from_sequences([[10, 11, 12, 13]]), min_match=2)
    mtp = Recorder()
    d = CombinedDrafter(mtp, min_match=2, store=store)
    ctx = type("C", (), {})()
    ctx.tokens = [1, 2, 3, 1, 2]  # prompt lookup: "1 2" continues with 3
    assert d.propose(ctx, 3).tokens == [3, 1, 2] and d.last == "ngram"
    ctx.tokens = [5, 10, 11]  # no repeat; the store continues "10 11"
    assert d.propose(ctx, 3).tokens == [12, 13] and d.last == "datastore"
    ctx.tokens = [5, 6, 11]  # a 1-token match is below the store's min_match: MTP
    assert d.propose(ctx, 2).tokens == [42, 42] and d.last == "mtp" and mtp.calls == 1
    assert d.rounds == {"ngram": 1, "datastore": 1, "mtp": 1}
    alone = CombinedDrafter(None, min_match=1, store=store)
    assert alone.propose(ctx, 2).tokens == [] and alone.last == ""


@pytest.mark.slow
def test_datastore_drafter_lossless_on_smollm2(tmp_path):
    """Built with the CLI from texts through the real tokenizer; greedy speculative output equals
    plain greedy on chat prompts; a store of another vocabulary is refused."""
    import mtpdraft
    from mtpdraft.config import SamplingParams, Stats
    from mtpdraft.decoding import generate
    from mtpdraft.train.data import encode_prompt

    from test_real_model import PROMPTS

    model, tok = mtpdraft.load("smollm2-135m-instruct")
    sp = SamplingParams(max_new_tokens=64)
    prompts = [encode_prompt(tok, p, True, 96) for p in PROMPTS[:8]]
    plain = [list(generate(model, ids, sp)) for ids in prompts]
    # the store: the target's own replies to the first four (what a service's log would hold)
    texts = tmp_path / "replies.jsonl"
    texts.write_text("".join(json.dumps({"text": tok.decode(out)}) + "\n" for out in plain[:4]))
    out = tmp_path / "s.safetensors"
    r = subprocess.run([sys.executable, "-m", "mtpdraft.cli", "datastore", "--model", "smollm2-135m-instruct",
                        "--texts", str(texts), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    drafter = make_drafter(str(out), model, "smollm2-135m-instruct")
    assert isinstance(drafter, CombinedDrafter) and drafter.store is not None
    again = make_drafter(str(out), model, "smollm2-135m-instruct")  # the server's drafter per request
    assert again is not drafter and again.store.store is drafter.store.store  # one store, loaded once
    stats = Stats()
    for ids, ref in zip(prompts, plain):
        assert list(generate(model, ids, sp, drafter=drafter, stats=stats)) == ref
    assert drafter.rounds["datastore"] > 0
    assert stats.decode_tokens > 1.5 * stats.cycles  # replies it has seen are drafted whole
    sampled = SamplingParams(max_new_tokens=32, temperature=0.7, seed=3)
    assert len(list(generate(model, prompts[5], sampled, drafter=drafter))) == 32
    Datastore.from_sequences([[1, 2]], vocab_size=1000).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="1000-token vocabulary"):
        make_drafter(str(tmp_path / "other.safetensors"), model, "smollm2-135m-instruct")
