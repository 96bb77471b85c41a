"""Datastore drafter: continue the text the way the target itself continued the same words
in a store of its own writing (retrieval-based drafting, as in REST).

Prompt lookup only helps where a text repeats itself; a chat model's answers rarely repeat
themselves, but they repeat each other (phrasings, formatting, boilerplate). The store holds
token sequences the target wrote (a training run's data: `mtpdraft datastore --run RUN`; or
texts of your own traffic: `--texts FILE.jsonl`). A lookup finds the places where the last n
tokens of the text occur (the longest n of MAX_NGRAM down to a minimum), then walks their
continuations token by token: the most frequent next token, then only the places that agree
with it, until they disagree (min_share) or end. Lossless like any drafter: the target
verifies, and a wrong draft only costs its rows.

The index, built on the first lookup (about 0.5 s for 3M tokens): the store's places sorted by their
next three tokens (packed into an int64), with the three after those beside them, so a
suffix of any length up to 6 is one binary search and a contiguous scan (the native
`kernels.ds_lookup`, tens of microseconds).

`--drafter FILE` (a datastore file) drafts by prompt lookup on any match, else from the store.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .. import kernels
from ..registry import DEFAULT_MODEL
from .base import Draft, DraftContext

FORMAT = "mtpdraft_datastore"  # the safetensors metadata "format" of a datastore file
MAX_NGRAM = 6  # the longest suffix looked up (the index holds 6 tokens a place)
MAX_MATCHES = 256  # places whose continuations are walked (an even spread of them)
MIN_SHARE = 0.7  # default: a draft goes on while this share of the places agree (chosen on validation prompts)
CONTEXT = 8  # tokens kept before a stored reply (a chat template's turn opening, not the prompt)
SEP = -1  # between sequences: a continuation ends there
_BITS = 20  # per packed token: vocabularies up to 2**20 - 1 ids
_MAX_DRAFT = 32
_SHARED: dict = {}  # the last store Datastore.shared loaded, and its file's identity
_SHARED_LOCK = threading.Lock()


def _pack(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # +1: the separator packs as 0, below every token
    return ((a + 1) << (2 * _BITS)) | ((b + 1) << _BITS) | (c + 1)


class Datastore:
    """Token sequences of the target's writing and an index of their 3-token prefixes."""

    def __init__(self, tokens: np.ndarray, vocab_size: int | None = None, model: str | None = None):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("datastore: tokens must be a 1-D integer array")
        t = tokens.astype(np.int64)
        if t.size and (t.min() < SEP or t.max() >= (1 << _BITS) - 1):
            raise ValueError(f"datastore: token ids must be in [0, {(1 << _BITS) - 2}] (or {SEP} between sequences)")
        if vocab_size is not None and t.size and t.max() >= vocab_size:
            raise ValueError(f"datastore: token id {int(t.max())} is outside the vocabulary of {vocab_size}")
        self.size, self.vocab_size, self.model = int(t.size), vocab_size, model
        # trailing separators: a continuation read past the end stops there
        self.tokens = np.concatenate([t, np.full(_MAX_DRAFT + MAX_NGRAM + 2, SEP, np.int64)])

    @functools.cached_property
    def index(self) -> tuple[torch.Tensor, ...]:
        """(keys, keys2, order, tokens) as kernels.ds_lookup reads them, built on first use (a
        store that is only built and saved never sorts)."""
        n, t = self.size, self.tokens
        keys = _pack(t[:n], t[1:n + 1], t[2:n + 2])
        order = np.argsort(keys, kind="stable")  # equal prefixes keep the store's order
        keys2 = _pack(t[3:n + 3], t[4:n + 4], t[5:n + 5])[order]  # the next three, beside them
        return tuple(torch.from_numpy(a) for a in (keys[order], keys2, order, t))

    @classmethod
    def from_sequences(cls, seqs, vocab_size: int | None = None, model: str | None = None) -> "Datastore":
        """One store of several token sequences (each ends at a separator)."""
        parts = []
        for s in seqs:
            parts += [np.asarray(s, np.int64).reshape(-1), np.array([SEP], np.int64)]
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.int64), vocab_size, model)

    @classmethod
    def from_run(cls, run: str | Path, vocab_size: int | None = None, model: str | None = None,
                 context: int = CONTEXT) -> "Datastore":
        """The store of a training run's data (RUN/data/sequences.jsonl): every sequence the
        target wrote for training, from `context` tokens before its prompt's end (left out: the
        validation prompts' sequences, and a --data file's text, which the target did not write)."""
        from ..train.train import FILE_SOURCE, VAL

        path = Path(run) / "data" / "sequences.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no training data there (run `mtpdraft train` first)")
        seqs = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    s = json.loads(line)
                    if not s["source"].startswith((VAL, FILE_SOURCE)):
                        seqs.append(s["tokens"][max(0, int(s["prompt_len"]) - context):])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a training sequence ({e})") from e
        if not seqs:
            raise ValueError(f"{path}: no sequence the target wrote for training")
        return cls.from_sequences(seqs, vocab_size, model)

    @staticmethod
    def run_model(run: str | Path) -> str:
        """The model a training run's target was (RUN/config.json)."""
        cfg = Path(run) / "config.json"
        try:
            return str(json.loads(cfg.read_text())["model"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg}: cannot read the run's model ({e})") from e

    @classmethod
    def from_texts(cls, path: str | Path, tokenizer, vocab_size: int | None = None,
                   model: str | None = None) -> "Datastore":
        """The store of a JSONL file of {"text": ...} lines (texts the model wrote, e.g. your
        service's replies), each tokenized as it stands (no BOS)."""
        from ..train.data import read_texts

        seqs = [tokenizer(text, add_special_tokens=False).input_ids for _, text in read_texts(path, str(path))]
        if not seqs:
            raise ValueError(f"{path}: no texts")
        return cls.from_sequences(seqs, vocab_size, model)

    @property
    def num_sequences(self) -> int:
        return int((self.tokens[:self.size] == SEP).sum())

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        data = torch.from_numpy(self.tokens[:self.size].astype(np.int32))
        path = Path(path)
        meta = {"format": FORMAT} | ({"vocab_size": str(self.vocab_size)} if self.vocab_size else {}) | \
            ({"model": self.model} if self.model else {})
        tmp = path.with_name(path.name + ".tmp")  # whole or not at all: a reader never sees half a file
        save_file({"tokens": data}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Datastore":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such datastore file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or "tokens" not in f.keys():
                    raise ValueError(f"{path}: not an mtpdraft datastore (format {meta.get('format')!r})")
                tokens = f.get_tensor("tokens")
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path}: unreadable datastore: {e}") from e
        if tokens.dtype != torch.int32 or tokens.dim() != 1:
            raise ValueError(f"{path}: datastore tokens must be a 1-D int32 tensor")
        try:
            vocab = int(meta["vocab_size"]) if meta.get("vocab_size") else None
            return cls(tokens.numpy(), vocab, meta.get("model"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def shared(cls, path: str | Path) -> "Datastore":
        """load(path), kept while the file is unchanged: every drafter on one file shares one
        store (read-only) instead of each reading and indexing it. (The server resolves its
        --drafter once at startup, drafter_factory: a file replaced while it runs is not reread.)"""
        path = Path(path).resolve()
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with _SHARED_LOCK:
            if _SHARED.get("key") != key:
                store = cls.load(path)
                store.index  # noqa: B018 -- built here, at the server's start, not in its first request
                _SHARED.update(key=key, store=store)
            return _SHARED["store"]

    def check_target(self, target) -> None:
        """Refuse a store written for another vocabulary (its drafts would be noise)."""
        if self.vocab_size is not None and self.vocab_size != target.vocab_size:
            written = f" (written for {self.model})" if self.model else ""
            raise ValueError(f"datastore of a {self.vocab_size}-token vocabulary{written}; "
                             f"{getattr(target, 'name', '') or 'the target'} has {target.vocab_size}")

    def lookup(self, tokens: list[int], k: int, min_match: int = 1, min_share: float = 0.0) -> tuple[list[int], int]:
        """Up to k tokens continuing the longest suffix of `tokens` (MAX_NGRAM down to min_match
        tokens) found in the store, and that suffix's length (0: none found). The continuation
        is walked over at most MAX_MATCHES of the suffix's places (an even spread of them in
        index order): at each step the most frequent next token (the smallest id on ties), then
        only the places that agree with it. It ends where ending the sequence is the most
        frequent next "token" (a tie included), or, after the first token (always drafted),
        where fewer than min_share of the places agree. A suffix found whose places all end
        there gives ([], n): shorter suffixes are not tried."""
        if k < 1 or not self.size or not tokens:
            return [], 0
        return kernels.ds_lookup(*self.index, list(tokens[-MAX_NGRAM:]), min(k, _MAX_DRAFT), min_match, MAX_MATCHES,
                                 _BITS, min_share)


class DatastoreDrafter:
    """Drafter-interface adapter of a Datastore: its lookup's continuation, as argmax drafts."""

    def __init__(self, store: Datastore, min_match: int = 1, min_share: float = MIN_SHARE):
        if not 1 <= min_match <= MAX_NGRAM:
            raise ValueError(f"min_match must be in 1..{MAX_NGRAM}, got {min_match}")
        if not 0.0 <= min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {min_share}")
        self.store, self.min_match, self.min_share = store, min_match, min_share

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        return self.store.lookup(tokens, k, self.min_match, self.min_share)[0]

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        return Draft(self.lookup(ctx.tokens, k))

    def observe(self, accepted: int, proposed: int) -> None:
        pass


def is_datastore(path: str | Path) -> bool:
    """Whether `path` is a datastore file (safetensors with this module's format)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 -- any unreadable file is simply not one
        return False


def cmd_datastore(args) -> int:
    from .. import load

    if (args.run is None) == (args.texts is None):
        raise ValueError("give one of --run RUN or --texts FILE.jsonl")
    model = args.model or DEFAULT_MODEL
    if args.run:  # the run's own target; --model, if given, must be it
        model = Datastore.run_model(args.run)
        if args.model and args.model != model:
            raise ValueError(f"{args.run} was written by {model}, not {args.model}")
    target, tok = load(model, "auto")
    store = (Datastore.from_run(args.run, target.vocab_size, model) if args.run
             else Datastore.from_texts(args.texts, tok, target.vocab_size, model))
    out = store.save(args.out)
    print(f"{out}: {store.size} tokens in {store.num_sequences} sequences ({out.stat().st_size / 2**20:.1f} MiB); "
          f"use it with --drafter {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("datastore", help="build a datastore drafter from text the model wrote",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"the target whose tokenizer the store uses (default: the run's, else {DEFAULT_MODEL})")
    p.add_argument("--run", default=None, help="a training run directory (mtpdraft train --out): its target-written data")
    p.add_argument("--texts", default=None, help='a JSONL file of {"text": ...} lines the model wrote')
    p.add_argument("--out", required=True, help="the datastore file to write (.safetensors)")
    p.set_defaults(func=cmd_datastore)
