"""Train an MTP drafter for a target model, on text the target writes itself.

    export MTPDRAFT_CACHE=/tmp/mtp/cache
    # a gemma-3-270m drafter (every stage resumes; budgets are wall-clock seconds, or
    # give deadlines: --set data_deadline='"04:22"' --set train_deadline='"04:44"')
    mtpdraft train --model gemma-3-270m --out /tmp/mtp/train/gemma-3-270m \\
        --data-budget-s 3600 --train-budget-s 3600
    # copy it into the package if it beats the untrained drafter
    mtpdraft train --model gemma-3-270m --out /tmp/mtp/train/gemma-3-270m \\
        --ship mtpdraft/drafters/shipped/gemma-3-270m
    # a demo / CI run on a tiny random model (a few minutes at most)
    python -c "from mtpdraft.testing import tiny_model_dir; tiny_model_dir('/tmp/tiny')"
    mtpdraft train --model /tmp/tiny --dtype fp32 --out /tmp/tiny-drafter --quick

Stages (each writes under --out and is skipped when its output exists; training
resumes from OUT/ckpt.pt, and `touch OUT/STOP` ends it early with what it learned):
  1. data      prompts (mtpdraft/data/train_prompts.jsonl, split by category into
               three disjoint sets: train, validation, eval) + short BOS openings;
               the target writes greedy continuations, some after a sampled opening
               (temperature), in batches of rows decoding together, for the train
               and validation prompts -> data/sequences.jsonl; the decoding also
               records what the drafter reads (data/recorded/*.pt, record_features)
  2. features  per position: the target's final hidden h_p, the K/V of the layers
               the drafter reads, greedy labels; as the data stage recorded them, or
               one batched prefill per group of sequences it did not record (a
               --data file) -> features/{train,val}.pt (val: the validation prompts')
  3. train     teacher-forced unrolled drafting (k steps, the drafter's own h
               carried between steps, the target's K/V at positions <= p, RoPE at
               p: exactly what inference does), clustered-head cross-entropy with
               a reduced softmax -> drafter/ (+ ckpt.pt while training)
  4. eval      tau, acceptance by position and tokens/s from the real speculative
               loop: on the validation prompts the centroid top-k (MTP alone at each
               candidate -> select_top_k.json, the fastest kept), then every variant
               (plain, untrained MTP, trained MTP, n-gram, combined = n-gram on a
               >= 2-token match, else MTP, with confidence gates) -> select.json,
               where `auto`'s variant is chosen; on the eval prompts plain, MTP, n-gram and that variant
               -> eval.json (the reported figures)
All settings live in TrainConfig; the command line sets a few of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..config import DEFAULT_DRAFT_LEN
from ..drafters.combined import FALLBACK_MIN_MATCH
from .data import (Job, encode_prompt, generate_batch, load_prompts, read_texts, split_sets, training_only,
                   uses_chat)
from .evaluate import LEN_TAG, at_draft_lens, evaluate
from .features import Features, compute_features, recorded_features
from .model import cluster_of, cluster_recalled, head_loss, inference_correct, new_drafter, source_layers, unrolled


@dataclass
class TrainConfig:
    model: str = "gemma-3-270m"
    out: str = "/tmp/mtp/train/run"
    dtype: str = "auto"  # the target's weights (auto: as `mtpdraft generate` runs it): data, labels, eval
    seed: int = 0
    # -- data ---------------------------------------------------------------------------------
    prompts_file: str | None = None  # default: the bundled train_prompts.jsonl
    # training-only prompts, never split into validation or eval (e.g. a broad set written
    # after the split was fixed); refused if one shares a passage with a validation or eval prompt
    extra_prompts_file: str | None = None
    # three disjoint prompt sets (per category, prompts sharing a passage on one side): train;
    # validation, for every choice (teacher-forced validation, centroid top-k, gate, what
    # `auto` runs); eval, only for the reported figures
    val_prompts_frac: float = 0.15
    eval_prompts_frac: float = 0.15
    val_opened_per_prompt: int = 1  # validation sequences per validation prompt besides its greedy one
    max_prompts: int = 0  # 0 = all
    max_prompt_tokens: int = 96
    chat: bool | None = None  # prompts as a user message through the chat template (None: when it has one)
    # the defaults write up to ~2.1M target tokens (158 training prompts x 33 + 3000 openings,
    # 256 each): about an hour at the ~600 tok/s measured with 64 rows on the bundled Gemma 3
    # 270M's default weights, 2 threads (features then ~1,400 tok/s)
    new_tokens: int = 256
    greedy_per_prompt: int = 1  # plain greedy continuation of the prompt
    opened_per_prompt: int = 32  # greedy continuations after `sample_first` sampled tokens
    bos_openings: int = 3000  # BOS + `sample_first` sampled tokens, then greedy
    sample_first: int = 6
    temperature: float = 0.9
    sampled_per_prompt: int = 0  # fully sampled rows (labelled by the target's argmax)
    gen_batch: int = 64  # rows decoding together (<= 64 keeps the runtime's exact kernels)
    data_budget_s: float = 0.0  # stop writing training sequences after this long (0 = write every job)
    data_file: str | None = None  # also train on this text (JSONL, {"text": ...} per line), labelled by the target
    data_file_max_tokens: int = 512  # tokens kept per line of data_file
    data_deadline: str = ""  # or at this UTC wall-clock time ("HH:MM" today, or an ISO timestamp)
    # the data stage's decoding keeps the drafter's features of what it writes (hidden state,
    # K/V, argmax labels: exactly what decoding computes), so the features stage runs the
    # target only over text it did not write (data_file); False: a second forward over all
    record_features: bool = True
    data_only: bool = False  # stop after the data stage (and its datastore: RUN/datastore.safetensors)
    # -- features -----------------------------------------------------------------------------
    feature_batch_tokens: int = 4096
    val_positions: int = 1500  # validate on (about) this many positions of the validation sequences
    # -- drafter ------------------------------------------------------------------------------
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_attention_heads: int = 4
    layer_types: tuple[str, ...] = ("full_attention",)
    num_centroids: int = 0  # 0 = auto (2048 for big vocabularies, vocab/16 for tiny ones)
    centroid_top_k: int = 0  # 0 = auto (32, at most a quarter of the clusters)
    tie_output_to_target: bool = True  # the head is the target's own table, read by h'
    # the drafter's factor on the target's input embedding (a power of two; 0 = auto: the one
    # bringing the embedding's RMS nearest 1, so the token is not drowned by the hidden state)
    input_embed_scale: float = 0.0
    # start from this drafter's weights (a drafter directory; its architecture replaces the
    # settings above): continue training a shipped drafter, e.g. with distill_weight > 0.
    # Its run's "untrained" copy is then this drafter, so `--ship` needs a gain over it.
    init_from: str | None = None
    # -- training -----------------------------------------------------------------------------
    draft_steps: int = 4  # k: unrolled steps per position
    step_decay: float = 0.8  # weight of step j is decay^(j-1)
    extra_clusters: int = 2  # competing clusters in the reduced softmax
    centroid_weight: float = 1.0
    hidden_weight: float = 0.1  # relative MSE of h' to the target's next hidden state
    distill_weight: float = 0.0  # weight of the KL to the target's distribution over the head's candidates
    batch_tokens: int = 2048  # positions per batch (sequences padded to a common length)
    epochs: float = 6.0
    max_iters: int = 0  # 0 = from epochs (and the time budget)
    train_budget_s: float = 0.0  # 0 = none; else the schedule is sized to fit it
    train_deadline: str = ""  # end training by this UTC time; the cosine schedule is re-sized as it goes
                              # (robust to the process being paused: iterations are timed, pauses are not)
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_iters: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 0  # torch threads (0 = leave as is)
    # the training forward's matmuls: "bf16" (autocast; weights, gradients and AdamW stay
    # fp32), "fp32", or "auto": bf16 where the CPU multiplies bf16 natively (AVX512_BF16/AMX)
    train_precision: str = "auto"
    eval_every: int = 100
    ckpt_every: int = 100
    # -- eval ---------------------------------------------------------------------------------
    eval_prompts: int = 16
    eval_new_tokens: int = 128
    eval_untrained_prompts: int = 6
    draft_len: int = DEFAULT_DRAFT_LEN
    # the validation selection also runs every drafting variant at these draft lengths ("NAME
    # k=K"); auto.json keeps the length its variant was chosen at (README: the draft length)
    select_draft_lens: tuple[int, ...] = (1, 2, 4, 8)
    min_match: int = 2  # combined drafter: n-gram when its match has >= this many tokens
    gates: tuple[float, ...] = (0.3, 0.6)  # also evaluate `combined` stopping a draft below these confidences
    # also evaluate "fallback:L": prompt lookup on any n-gram match, else an MTP draft of at most L tokens
    fallback_lens: tuple[int, ...] = (1, 2)
    sampled_temperature: float = 0.7  # auto's variant for temperature > 0 is chosen at this one (0: not chosen)
    # centroid top-k (clusters searched per drafting step) candidates, chosen in the real loop:
    # MTP alone, greedy, on the validation prompts, the fastest. Teacher-forced tau is logged
    # per k too, but it chose 32 in three gemma-3-270m runs where 4 ran faster (README)
    top_k_candidates: tuple[int, ...] = (4, 8, 16, 32)

    def __post_init__(self):
        if self.train_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train_precision must be auto, bf16 or fp32, got {self.train_precision!r}")
        if not isinstance(self.select_draft_lens, (list, tuple)):
            raise ValueError(f"select_draft_lens must be a list of draft lengths, got {self.select_draft_lens!r}")
        for k in (self.draft_len, *self.select_draft_lens):  # refused now, not after hours of training
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
                raise ValueError(f"draft_len and select_draft_lens must be integers in 1..32, got {k!r}")

    def prompt_sets(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(train, validation, eval) as this run splits them: prompts_file (its first max_prompts)
        split by category; extra_prompts_file's prompts join the training set only."""
        prompts = load_prompts(self.prompts_file)
        if self.max_prompts:
            prompts = prompts[: self.max_prompts]
        train, val, evals = split_sets(prompts, self.val_prompts_frac, self.eval_prompts_frac, self.seed)
        if self.extra_prompts_file:
            train = train + training_only(load_prompts(self.extra_prompts_file), prompts, val + evals)
        return train, val, evals

    @classmethod
    def quick_config(cls, **kw) -> "TrainConfig":
        """A few minutes on a tiny model: small data, small drafter, short schedule."""
        base = dict(max_prompts=40, new_tokens=48, opened_per_prompt=1, bos_openings=8, gen_batch=16,
                    hidden_size=64, intermediate_size=128, num_attention_heads=4, epochs=10.0, batch_tokens=1024,
                    eval_every=40, ckpt_every=200, warmup_iters=10, lr=3e-3, eval_prompts=4, eval_new_tokens=32,
                    eval_untrained_prompts=4, gates=(), fallback_lens=(1,), select_draft_lens=(2,))
        base.update(kw)
        return cls(**base)


def deadline_ts(spec: str) -> float | None:
    """'HH:MM' (UTC, today) or an ISO timestamp -> epoch seconds; '' -> None."""
    if not spec:
        return None
    import datetime as dt

    if len(spec) <= 5 and ":" in spec:
        h, m = map(int, spec.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()
    return dt.datetime.fromisoformat(spec).timestamp()


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _auto_clusters(vocab: int, cfg: TrainConfig) -> tuple[int, int]:
    c = cfg.num_centroids
    if not c:
        c = 2048 if vocab >= 2048 * 64 else 1 << max(1, int(math.log2(max(2, vocab // 16))))
        while vocab % c:
            c //= 2
    k = cfg.centroid_top_k or max(1, min(32, c // 4))
    return c, k


def auto_embed_scale(target) -> float:
    """The power of two that brings the RMS of the target's input embeddings nearest 1
    (1 for Gemma, whose embeddings are scaled by sqrt(D); 8 for SmolLM2, RMS ~0.1)."""
    V = target.args.vocab_size
    rows = torch.arange(0, V, max(1, V // 4096))
    rms = float(target.embed(rows[None]).float().pow(2).mean().sqrt())
    return 2.0 ** round(-math.log2(rms)) if rms > 0 else 1.0


def drafter_settings(target, cfg: TrainConfig) -> dict:
    c, k = _auto_clusters(target.args.vocab_size, cfg)
    kv = target.args.num_key_value_heads
    return dict(input_embed_scale=cfg.input_embed_scale or auto_embed_scale(target),
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_attention_heads=-(-cfg.num_attention_heads // kv) * kv,  # a multiple of the target's KV heads
                layer_types=list(cfg.layer_types), use_ordered_embeddings=target.args.vocab_size % c == 0,
                num_centroids=c, centroid_intermediate_top_k=k, tie_output_to_target=cfg.tie_output_to_target)


# -- stage 1 --------------------------------------------------------------------------------
VAL = "val/"  # source prefix of the validation prompts' sequences (never trained on)
DATASTORE = "datastore.safetensors"  # the run's data as a datastore drafter
FILE_SOURCE = "file:"  # source prefix of a --data file's sequences (text the target did not write)
RECORDED = "recorded"  # data/RECORDED/*.pt: the features the data stage's decoding recorded


def make_jobs(cfg: TrainConfig, tok, train_prompts: list[dict], bos: int,
              val_prompts: list[dict] = ()) -> list[dict]:
    rng = random.Random(cfg.seed)
    jobs = []
    sets = [(p, "", cfg.greedy_per_prompt, cfg.opened_per_prompt, cfg.sampled_per_prompt) for p in train_prompts]
    sets += [(p, VAL, 1, cfg.val_opened_per_prompt, 0) for p in val_prompts]
    chat = uses_chat(tok, cfg.chat)
    for p, prefix, greedy, opened, sampled in sets:
        ids = encode_prompt(tok, p["prompt"], chat, cfg.max_prompt_tokens)
        src = prefix + p["id"]
        for r in range(greedy):
            jobs.append(dict(prompt=ids, temperature=0.0, sample_first=0, source=f"{src}:greedy"))
        for r in range(opened):
            jobs.append(dict(prompt=ids, temperature=cfg.temperature, sample_first=cfg.sample_first,
                             source=f"{src}:opened{r}"))
        for r in range(sampled):
            jobs.append(dict(prompt=ids, temperature=cfg.temperature, sample_first=-1, source=f"{src}:sampled{r}"))
    for r in range(cfg.bos_openings):
        jobs.append(dict(prompt=[bos], temperature=1.0, sample_first=cfg.sample_first, source=f"bos:{r}"))
    for i, j in enumerate(jobs):
        j["id"], j["seed"] = i, rng.randrange(1 << 30)
    return jobs


def file_sequences(cfg: TrainConfig, tok, first_id: int) -> list[dict]:
    """data_file's texts as sequences to teacher-force: every position is labelled by the
    target's own argmax (as for fully sampled rows), so the drafter learns the target's
    continuations of text like the user's."""
    if not cfg.data_file:
        return []
    path = Path(cfg.data_file)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    out = []
    for n, text in read_texts(path, f"--data {path}"):
        ids = tok(text).input_ids[: cfg.data_file_max_tokens]
        if len(ids) >= 2:
            out.append(dict(id=first_id + len(out), source=f"{FILE_SOURCE}{n}", tokens=ids, prompt_len=1,
                            greedy_from=-1))
    if not out:
        raise ValueError(f"--data {path}: no text of at least 2 tokens")
    return out


def stage_data(cfg: TrainConfig, model, tok, train_prompts: list[dict], val_prompts: list[dict] = (),
               layers: list[int] | None = None) -> list[dict]:
    """Write the sequences (data/sequences.jsonl). With `layers`, the decoding also records
    the drafter's features of every sequence it writes (data/recorded/*.pt, one file per
    batch; the features stage then reads them instead of running the target again)."""
    from ..decoding.engine import eos_ids_of
    from tqdm import tqdm

    ddir = Path(cfg.out) / "data"
    ddir.mkdir(parents=True, exist_ok=True)
    done_flag, seq_file, rdir = ddir / "DONE.json", ddir / "sequences.jsonl", ddir / RECORDED
    bos = getattr(tok, "bos_token_id", None)
    bos = bos if bos is not None else getattr(model.args, "bos_token_id", 0) or 0
    jobs = make_jobs(cfg, tok, train_prompts, bos, val_prompts)
    have = {}
    if seq_file.exists():
        for line in seq_file.read_text().splitlines():
            if line.strip():
                s = json.loads(line)
                have[s["id"]] = s
    if done_flag.exists():
        return [have[i] for i in sorted(have)]
    todo = [j for j in jobs if j["id"] not in have]
    with seq_file.open("a") as f:  # the user's own text: no generation, labelled in the features stage
        for rec in file_sequences(cfg, tok, len(jobs)):
            if rec["id"] not in have:
                have[rec["id"]] = rec
                f.write(json.dumps(rec) + "\n")
    # rows of similar prompt length decode together (less prefill imbalance)
    todo.sort(key=lambda j: (len(j["prompt"]), j["id"]))
    eos = eos_ids_of(model, tok)
    t0, ntok = time.perf_counter(), 0
    bar = tqdm(total=len(jobs), initial=len(have), desc="data", unit="seq", dynamic_ncols=True)
    with seq_file.open("a") as f:
        def chunks(js: list[dict]) -> list[list[dict]]:
            return [js[i:i + cfg.gen_batch] for i in range(0, len(js), cfg.gen_batch)]

        # the validation sequences (every choice is made on them; a few dozen) come first and
        # are always written; the budget and deadline cut the training jobs, in shuffled
        # batches so that a cut keeps every kind of job
        val_batches = chunks([j for j in todo if j["source"].startswith(VAL)])
        batches = chunks([j for j in todo if not j["source"].startswith(VAL)])
        random.Random(cfg.seed).shuffle(batches)
        for n, batch in enumerate(val_batches + batches):
            if n >= len(val_batches):
                if cfg.data_budget_s and time.perf_counter() - t0 > cfg.data_budget_s:
                    _log(f"data budget of {cfg.data_budget_s:.0f} s reached")
                    break
                if deadline_ts(cfg.data_deadline) and time.time() > deadline_ts(cfg.data_deadline):
                    _log(f"data deadline {cfg.data_deadline} reached")
                    break
            gj = []
            for j in batch:
                sf = j["sample_first"]
                gj.append(Job(j["prompt"], cfg.new_tokens, j["temperature"], j["seed"], j["source"],
                              sample_first=sf))
            out = generate_batch(model, gj, eos, record=layers)
            recs = []
            for j, s in zip(batch, out):
                sf = j["sample_first"]
                recs.append(dict(id=j["id"], source=j["source"], tokens=s[0] if layers is not None else s,
                                 prompt_len=len(j["prompt"]), greedy_from=-1 if sf < 0 else len(j["prompt"]) + sf))
            if layers is not None:  # the features first: a sequence in sequences.jsonl has its file
                rdir.mkdir(exist_ok=True)
                feats = recorded_features(recs, [s[1] for s in out], layers)
                feats.save(rdir / f"{recs[0]['id']:08d}.pt", ids=[r["id"] for r in recs])
            for rec in recs:
                have[rec["id"]] = rec
                f.write(json.dumps(rec) + "\n")
                ntok += len(rec["tokens"]) - rec["prompt_len"]
            f.flush()
            bar.update(len(batch))
            bar.set_postfix(tok_s=round(ntok / (time.perf_counter() - t0), 1))
    bar.close()
    dt = time.perf_counter() - t0
    seqs = [have[i] for i in sorted(have)]
    info = dict(sequences=len(seqs), generated_tokens_this_run=ntok, seconds_this_run=round(dt, 1),
                tokens_per_s=round(ntok / dt, 1) if dt > 0 else None,
                total_tokens=sum(len(s["tokens"]) for s in seqs),
                # what the target wrote (a data file's text is the user's, not the target's)
                target_tokens=sum(len(s["tokens"]) - s["prompt_len"] for s in seqs
                                  if not s["source"].startswith(FILE_SOURCE)),
                trainable_positions=sum(len(s["tokens"]) - max(s["prompt_len"], s["greedy_from"]) for s in seqs),
                gen_batch=cfg.gen_batch, jobs=len(jobs))
    done_flag.write_text(json.dumps(info, indent=2))
    _log(f"data: {info}")
    return seqs


# -- stage 2 --------------------------------------------------------------------------------
def stage_features(cfg: TrainConfig, model, seqs: list[dict], layers: list[int]) -> tuple[Features, Features]:
    fdir = Path(cfg.out) / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    paths = {n: fdir / f"{n}.pt" for n in ("train", "val")}
    if all(p.exists() for p in paths.values()):
        f = {n: Features.load(p) for n, p in paths.items()}
        if f["train"].layers == layers:
            return f["train"], f["val"]
        _log("cached features read other layers: recomputing")
    # validation: the sequences of the validation prompts (disjoint from the training prompts)
    split = {"train": [s for s in seqs if not s["source"].startswith(VAL)],
             "val": [s for s in seqs if s["source"].startswith(VAL)]}
    recorded = recorded_parts(Path(cfg.out) / "data" / RECORDED, split, layers)
    out = {}
    for n, part in split.items():
        t0 = time.perf_counter()
        # what the data stage recorded, batch by batch; the target runs only over the rest
        # (a data file's text, sequences of a data stage that recorded nothing)
        parts, covered = recorded[n]
        rest = [sq for sq in part if sq["id"] not in covered]
        if rest or not parts:
            parts.append(compute_features(model, rest, layers, cfg.feature_batch_tokens))
        feats = Features.concat(parts)
        del parts
        dt = time.perf_counter() - t0
        _log(f"features[{n}]: {len(part)} sequences, {int(feats.offsets[-1])} positions "
             f"({len(part) - len(rest)} recorded by the data stage, {len(rest)} run now) in {dt:.1f} s")
        feats.save(paths[n])
        out[n] = feats
    return out["train"], out["val"]


def recorded_parts(rdir: Path, split: dict[str, list[dict]], layers: list[int]) -> dict[str, tuple[list, set]]:
    """Per split name: (the features the data stage recorded for its sequences, read once per
    file, and the ids they cover). A sequence counts where its recorded tokens are its own and
    the K/V are of `layers`; one recorded twice (a resumed batch) is taken once."""
    want = {n: {s["id"]: s["tokens"] for s in part} for n, part in split.items()}
    found = {n: ([], set()) for n in split}
    for f in sorted(rdir.glob("*.pt")) if rdir.is_dir() else []:
        feats, ids = Features.load(f, with_ids=True)
        if ids is None or feats.layers != layers:
            continue
        for n, (parts, covered) in found.items():
            idx = [i for i, sid in enumerate(ids) if sid in want[n] and sid not in covered
                   and feats.tokens[int(feats.offsets[i]):int(feats.offsets[i + 1])].tolist() == want[n][sid]]
            if idx:
                parts.append(feats.select(idx))
                covered.update(ids[i] for i in idx)
    return found


# -- stage 3 --------------------------------------------------------------------------------
def batches_of(feats: Features, batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Sequences grouped by length into batches of at most batch_tokens padded positions."""
    order = sorted(range(feats.num_sequences), key=lambda i: (feats.length(i), rng.random()))
    out, cur, T = [], [], 0
    for i in order:
        n = feats.length(i)
        if cur and max(T, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, T = [], 0
        cur.append(i)
        T = max(T, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def batch_loss(drafter, target, b: dict, cfg: TrainConfig, clusters: torch.Tensor, train: bool = True):
    """Loss of one batch and per-step metrics: step accuracy (inference head proxy)
    and the chained acceptance (step j counts only if steps 1..j were right)."""
    k = cfg.draft_steps
    seq, lab, hid = b["tokens"], b["labels"], b["hidden"]
    B, T = seq.shape
    # the features hold each target layer's K/V once; drafter layers may share a layer or come in another order
    kv = [b["kv"][b["layers"].index(i)] for i in drafter.source_layers(target)]
    outs = unrolled(drafter, target, seq, hid, kv, k)
    p = torch.arange(T)
    row_ok = p[None, :] >= b["train_from"][:, None]  # [B, T]
    labp = torch.cat([lab, torch.full((B, k), -1, dtype=lab.dtype)], 1)
    hidp = torch.cat([hid, torch.zeros(B, k, hid.shape[2], dtype=hid.dtype)], 1)
    weights = [cfg.step_decay ** j for j in range(k)]
    total = sum(weights)
    loss = torch.zeros(())
    metrics = {"acc": [], "n": []}
    chain = row_ok.clone()
    for j, (x, h) in enumerate(outs, start=1):
        lj = labp[:, j:j + T]  # label of row p at step j: the greedy token after position p + j
        ok = row_ok & (lj >= 0)
        y = h if drafter.config.tie_output_to_target else x
        yv, lv = y[ok], lj[ok]
        if lv.numel() == 0:
            metrics["acc"].append(0.0)
            metrics["n"].append(0)
            continue
        ht = hidp[:, j:j + T][ok].float()  # the target's hidden whose logits chose the label
        l, correct = head_loss(drafter, target, yv, lv, clusters, cfg.extra_clusters, cfg.centroid_weight,
                               teacher=ht, distill_weight=cfg.distill_weight)
        if not train:  # exactly the inference head's argmax
            correct = inference_correct(drafter, target, yv, lv)
            if drafter.config.use_ordered_embeddings:
                metrics.setdefault("recall", []).append(int(cluster_recalled(drafter, yv, lv, clusters).sum()))
        if cfg.hidden_weight > 0:
            l = l + cfg.hidden_weight * ((h[ok] - ht) ** 2).mean() / (ht ** 2).mean().clamp_min(1e-6)
        loss = loss + weights[j - 1] / total * l
        full_correct = torch.zeros(B, T, dtype=torch.bool)
        full_correct[ok] = correct
        chain = chain & full_correct
        metrics["acc"].append(float(correct.float().mean()))
        metrics["n"].append(int(ok.sum()))
        metrics.setdefault("chain", []).append(int((chain & row_ok).sum()))
    metrics["rows"] = int(row_ok.sum())
    return loss, metrics


def train_autocast(cfg: TrainConfig):
    """The context the training forward runs in: bf16 autocast (about 1.4x faster per
    iteration on an AMX Xeon, measured 2026-12-07) or none (fp32)."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if cfg.train_precision == "bf16" or (cfg.train_precision == "auto" and native):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(it: int, total: int, cfg: TrainConfig) -> float:
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    t = min(1.0, (it - cfg.warmup_iters) / max(1, total - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def validate(drafter, target, val: Features, cfg: TrainConfig, clusters) -> dict:
    """Held-out teacher-forced metrics with the inference head: per-step accuracy,
    acceptance by position (chained) and the tau this implies at k = draft_steps."""
    if val.num_sequences == 0:
        return {}
    # a fixed subset of about val_positions trained positions (the exact head is costly)
    idx, n = [], 0
    for i in range(val.num_sequences):
        if n >= cfg.val_positions:
            break
        idx.append(i)
        n += val.length(i) - int(val.train_from[i])
    rows = 0
    acc_n = [0] * cfg.draft_steps
    acc_c = [0] * cfg.draft_steps
    chain = [0] * cfg.draft_steps
    recall = [0] * cfg.draft_steps
    for b in range(0, len(idx), 8):
        _, m = batch_loss(drafter, target, val.batch(idx[b:b + 8]), cfg, clusters, train=False)
        rows += m["rows"]
        for j in range(len(m["acc"])):
            acc_n[j] += m["n"][j]
            acc_c[j] += m["acc"][j] * m["n"][j]
            chain[j] += m["chain"][j] if j < len(m.get("chain", [])) else 0
            recall[j] += m["recall"][j] if j < len(m.get("recall", [])) else 0
    acc = [c / n if n else 0.0 for c, n in zip(acc_c, acc_n)]
    accept = [c / rows if rows else 0.0 for c in chain]
    res = {"val_step_acc": [round(a, 4) for a in acc], "val_accept_by_pos": [round(a, 4) for a in accept],
           "val_tau": round(1 + sum(accept), 4)}
    if drafter.config.use_ordered_embeddings:  # the ceiling the clusters put on each step's accuracy
        res["val_cluster_recall"] = [round(r / n, 4) if n else 0.0 for r, n in zip(recall, acc_n)]
    return res


def _trainable(drafter):
    params = [p for n, p in drafter.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return decay, no_decay


def save_drafter(drafter, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a copy with matrices in `dtype` (norm scales and the ordering stay exact)."""
    import copy

    d = copy.deepcopy(drafter)
    for p in d.parameters():
        p.requires_grad_(False)
        if p.ndim > 1:
            p.data = p.data.to(dtype)
    return d.save(path)


def run_layer_types(cfg: TrainConfig) -> list[str]:
    """The drafter's layer types (which target layers' K/V the features store)."""
    if cfg.init_from:
        from ..drafters.mtp import MTPConfig

        return list(MTPConfig.read(cfg.init_from).layer_types)
    return list(cfg.layer_types)


def initial_drafter(cfg: TrainConfig, target):
    """The drafter training starts from: fresh (TrainConfig's architecture) or init_from's, in fp32."""
    from ..drafters.mtp import MTPConfig, MTPDrafter

    if not cfg.init_from:
        settings = drafter_settings(target, cfg)
        prev = Path(cfg.out) / "untrained"
        if (prev / "config.json").exists():  # a resumed run keeps the scale it started with (a checkpoint holds tensors only)
            settings["input_embed_scale"] = MTPConfig.read(prev).input_embed_scale
        return new_drafter(target, settings, cfg.seed)

    d = MTPDrafter.load(cfg.init_from)  # fp32 (its stored bf16 matrices are exact in fp32)
    d.check_target(target)
    if d.config.tie_output_to_target != cfg.tie_output_to_target:
        raise ValueError(f"init_from {cfg.init_from}: tie_output_to_target is {d.config.tie_output_to_target}, "
                         f"the run's setting is {cfg.tie_output_to_target}")
    _log(f"starting from the drafter in {cfg.init_from}")
    return d


def stage_train(cfg: TrainConfig, target, train: Features, val: Features):
    from tqdm import tqdm

    out = Path(cfg.out)
    final = out / "drafter"
    if (final / "config.json").exists():
        from ..drafters.mtp import MTPDrafter

        return MTPDrafter.load(final)
    torch.manual_seed(cfg.seed)
    drafter = initial_drafter(cfg, target)
    if not (out / "untrained" / "config.json").exists():
        save_drafter(drafter, out / "untrained")
    clusters = cluster_of(drafter) if drafter.config.use_ordered_embeddings else None
    decay, no_decay = _trainable(drafter)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    per_epoch = len(batches_of(train, cfg.batch_tokens, random.Random(0)))
    total = cfg.max_iters or max(1, int(cfg.epochs * per_epoch))
    it, log = 0, []
    ck = out / "ckpt.pt"
    if ck.exists():
        s = torch.load(ck, weights_only=True)  # tensors and plain Python values only: never unpickle code
        drafter.load_state_dict(s["drafter"])
        opt.load_state_dict(s["opt"])
        it, total, log = s["it"], s["total"], s["log"]
        rng.setstate(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        _log(f"resumed at iteration {it}/{total}")
    sized = bool(ck.exists()) or not cfg.train_budget_s
    t_start = time.perf_counter()
    it0 = it
    queue: list[list[int]] = []
    bar = tqdm(total=total, initial=it, desc="train", dynamic_ncols=True)
    ema = None
    deadline = deadline_ts(cfg.train_deadline)
    cap = total
    times: list[float] = []
    while it < total:
        t_it = time.perf_counter()
        if deadline is not None:
            left = deadline - time.time()
            if left <= 0:
                _log(f"train deadline {cfg.train_deadline} reached at iteration {it}")
                total = it
                break
            if len(times) >= 3:  # median iteration time: a paused iteration does not count
                per_it = sorted(times[-30:])[len(times[-30:]) // 2]
                total = max(it + 1, min(cap, it + int(left / per_it)))
                bar.total = total
        if (out / "STOP").exists():  # `touch OUT/STOP`: end training now, keep what was learned
            _log(f"STOP file found: ending training at iteration {it}/{total}")
            total = it
            break
        if not queue:
            queue = batches_of(train, cfg.batch_tokens, rng)
        idx = queue.pop()
        for g in opt.param_groups:
            g["lr"] = lr_at(it, total, cfg)
        with train_autocast(cfg):
            loss, m = batch_loss(drafter, target, train.batch(idx), cfg, clusters)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(decay + no_decay, cfg.grad_clip)
        opt.step()
        it += 1
        times.append(time.perf_counter() - t_it)
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.update(1)
        post = {"loss": round(ema, 3), "acc1": round(m["acc"][0], 3), "lr": f"{opt.param_groups[0]['lr']:.1e}"}
        if not sized and it - it0 == 5:  # size the cosine schedule to the time budget
            per_it = (time.perf_counter() - t_start) / 5
            total = max(it + 1, min(total, int(cfg.train_budget_s / per_it)))
            bar.total = total
            sized = True
            _log(f"{per_it:.2f} s/iteration: {total} iterations ({total / per_epoch:.2f} epochs of {per_epoch})")
        if it % cfg.eval_every == 0 or it == total:
            v = validate(drafter, target, val, cfg, clusters)
            log.append({"it": it, "loss": round(ema, 4), "s": round(time.perf_counter() - t_start, 1), **v})
            post.update(val_acc1=v.get("val_step_acc", [0])[0], val_tau=v.get("val_tau"))
            bar.write(json.dumps(log[-1]))
        bar.set_postfix(post)
        if it % cfg.ckpt_every == 0 or it == total:
            torch.save({"drafter": drafter.state_dict(), "opt": opt.state_dict(), "it": it, "total": total,
                        "log": log, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, ck)
    bar.close()
    (out / "STOP").unlink(missing_ok=True)
    for p in drafter.parameters():
        p.requires_grad_(False)
    info = {"iterations": total, "epochs": round(total / per_epoch, 3), "train_seconds_this_run":
            round(time.perf_counter() - t_start, 1), "train_positions": int(train.offsets[-1]),
            "params": sum(p.numel() for p in drafter.parameters()), "log": log,
            "drafter": {k: getattr(drafter.config, k) for k in drafter_settings(target, cfg)}}
    save_drafter(drafter, final)
    (out / "train_log.json").write_text(json.dumps(info, indent=2))
    return drafter


def top_k_teacher_forced(cfg: TrainConfig, target, val: Features) -> dict:
    """Teacher-forced validation per centroid top-k candidate (tau; at the first drafted
    token, how often the label's cluster is searched and the token right), for the log and
    the model card -> train_log.json "top_k_tuning" (done once). The choice is the real
    loop's (select_top_k): this metric overstated a larger top-k's gain."""
    from ..drafters.mtp import MTPDrafter

    out = Path(cfg.out)
    log_path = out / "train_log.json"
    info = json.loads(log_path.read_text()) if log_path.exists() else {}
    if "top_k_tuning" in info or val.num_sequences == 0:
        return info.get("top_k_tuning", {})
    drafter = MTPDrafter.load(out / "drafter")
    c = drafter.config
    if not c.use_ordered_embeddings:
        return {}
    clusters = cluster_of(drafter)
    taus, recall, acc1 = {}, {}, {}
    for k in top_k_candidates(cfg, c.num_centroids, c.centroid_intermediate_top_k):
        c.centroid_intermediate_top_k = k
        v = validate(drafter, target, val, cfg, clusters)
        taus[k] = v.get("val_tau", 1.0)
        recall[k], acc1[k] = v.get("val_cluster_recall", [0.0])[0], v.get("val_step_acc", [0.0])[0]
        _log(f"top-k {k}: validation teacher-forced tau {taus[k]}, step 1: label's cluster searched "
             f"{recall[k]:.1%}, right {acc1[k]:.1%}")
    res = {"val_tau_by_top_k": {str(k): t for k, t in taus.items()},
           "val_step1_cluster_recall_by_top_k": {str(k): r for k, r in recall.items()},
           "val_step1_acc_by_top_k": {str(k): a for k, a in acc1.items()}}
    info["top_k_tuning"] = res
    log_path.write_text(json.dumps(info, indent=2))
    return res


def top_k_candidates(cfg: TrainConfig, num_centroids: int, current: int) -> list[int]:
    return sorted({k for k in (*cfg.top_k_candidates, current) if 0 < k <= num_centroids})


def _loop_prompts(cfg: TrainConfig, prompt_set: list[dict]):
    """The target as `generate` runs it, and the first `eval_prompts` of prompt_set encoded as
    it serves them (chat template or plain text): what every real-loop stage decodes."""
    from .. import load

    model, tok = load(cfg.model, cfg.dtype)
    chat = uses_chat(tok, cfg.chat)
    return model, tok, [encode_prompt(tok, p["prompt"], chat, cfg.max_prompt_tokens)
                        for p in prompt_set[: cfg.eval_prompts]]


def select_top_k(cfg: TrainConfig, val_prompts: list[dict]) -> dict:
    """Choose the centroid top-k in the real speculative loop: the MTP drafter alone, greedy,
    at each candidate against plain decoding on the validation prompts in one run (rotating
    order) -> OUT/select_top_k.json; the fastest goes into drafter/config.json. Each searched
    cluster costs drafting time, and what a larger top-k adds to acceptance is small there."""
    from ..drafters import make_drafter

    out = Path(cfg.out)
    path = out / "select_top_k.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg_path = out / "drafter" / "config.json"
    dc = json.loads(cfg_path.read_text())
    # a run whose variants were selected before this stage existed keeps its top-k
    if not dc.get("use_ordered_embeddings") or not val_prompts or (out / "select.json").exists():
        return {}
    cands = top_k_candidates(cfg, dc["num_centroids"], dc["centroid_intermediate_top_k"])
    model, tok, prompts = _loop_prompts(cfg, val_prompts)
    drafters = {"plain": lambda: None}
    for k in cands:  # one drafter per k: the rotation would otherwise rebuild the native step at each switch
        src = make_drafter(str(out / "drafter"), model)
        src.drafter.config.centroid_intermediate_top_k = k
        drafters[f"mtp top-k={k}"] = lambda src=src: src
    res = evaluate(model, tok, prompts, drafters, cfg.eval_new_tokens, cfg.draft_len)
    speed = {k: res["configs"][f"mtp top-k={k}"]["decode_tokens_per_s"] for k in cands}
    chosen = max(cands, key=lambda k: (speed[k], -k))
    res.update(candidates=cands, chosen=chosen, prompt_set="validation",
               prompt_ids=[p["id"] for p in val_prompts[: cfg.eval_prompts]])
    dc["centroid_intermediate_top_k"] = chosen
    cfg_path.write_text(json.dumps(dc, indent=2))
    path.write_text(json.dumps(res, indent=2))
    _log("centroid top-k, real loop (MTP alone, validation): "
         + ", ".join(f"{k}: {speed[k]:.1f} tok/s" for k in cands) + f" -> {chosen}")
    return res


# -- stage 4 --------------------------------------------------------------------------------
def chosen_variant(select: dict) -> str:
    """What `--drafter auto` runs: of plain decoding (no draft), MTP alone, prompt lookup
    alone and the combined variants, the fastest on the validation prompts."""
    c = select["configs"]
    return max((n for n in c if (b := n.partition(LEN_TAG)[0]) in ("plain", "mtp", "ngram")
                or b.startswith(("combined", "fallback"))),
               key=lambda n: c[n]["decode_tokens_per_s"])


def stage_eval(cfg: TrainConfig, prompt_set: list[dict], name: str, only: list[str] | None = None,
               temperature: float = 0.0) -> dict:
    """The real speculative loop on `prompt_set` -> OUT/{name}.json: "select" runs every
    variant on the validation prompts (the choices are made there), "eval" runs `only`
    these on the eval prompts (the reported figures); "*_sampled" the same at `temperature`."""
    from ..drafters import MTPDraftSource, NgramDrafter, make_drafter
    from ..drafters.combined import CombinedDrafter

    out = Path(cfg.out)
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok, prompts = _loop_prompts(cfg, prompt_set)
    mtp = make_drafter(str(out / "drafter"), model)
    untrained = make_drafter(str(out / "untrained"), model)
    drafters = {
        "plain": lambda: None,
        "mtp": lambda: mtp,
        "ngram": lambda: NgramDrafter(),
        "combined": lambda: CombinedDrafter(mtp, min_match=cfg.min_match),
        "mtp_untrained": lambda: untrained,
    }
    for g in cfg.gates:  # MTP drafts end at the first token below confidence g (the first is always drafted)
        gated = MTPDraftSource(mtp.drafter, min_confidence=g)  # the same weights, loaded once
        drafters[f"combined@{g}"] = lambda gated=gated: CombinedDrafter(gated, min_match=cfg.min_match)
    for n in cfg.fallback_lens:
        drafters[f"fallback:{n}"] = lambda n=n: CombinedDrafter.fallback(mtp, n)
    # the same variants at the other draft lengths: "NAME k=K" (unnamed: cfg.draft_len)
    extra, lens = at_draft_lens({n: f for n, f in drafters.items() if n not in ("plain", "mtp_untrained")},
                                sorted(set(cfg.select_draft_lens) - {cfg.draft_len}), fixed=())
    drafters.update(extra)
    if only is not None:
        drafters = {n: f for n, f in drafters.items() if n in only}
    res = evaluate(model, tok, prompts, drafters, cfg.eval_new_tokens, cfg.draft_len,
                   only_first={"mtp_untrained": cfg.eval_untrained_prompts}, temperature=temperature,
                   draft_lens={n: k for n, k in lens.items() if n in drafters})
    res.update(model=cfg.model, dtype=cfg.dtype, weights=model.weights_format, prompt_set=name,
               prompt_ids=[p["id"] for p in prompt_set[: cfg.eval_prompts]])
    path.write_text(json.dumps(res, indent=2))
    return res


def run(cfg: TrainConfig) -> dict:
    from .. import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_prompts, val_prompts, eval_prompts = cfg.prompt_sets()
    (out / "split.json").write_text(json.dumps({"train": [p["id"] for p in train_prompts],
                                                "validation": [p["id"] for p in val_prompts],
                                                "eval": [p["id"] for p in eval_prompts]}, indent=1))
    model, tok = load(cfg.model, cfg.dtype)
    _log(f"target {cfg.model} ({model.weights_format}); prompts: {len(train_prompts)} training, "
         f"{len(val_prompts)} validation, {len(eval_prompts)} eval")
    t0 = time.perf_counter()
    layers = sorted(set(source_layers(run_layer_types(cfg), model)))
    seqs = stage_data(cfg, model, tok, train_prompts, val_prompts, layers if cfg.record_features else None)
    ds_path, done = out / DATASTORE, out / "data" / "DONE.json"
    if not ds_path.exists() or (done.exists() and done.stat().st_mtime > ds_path.stat().st_mtime):
        from ..drafters.datastore import Datastore  # the target's writing as a datastore drafter: seconds

        try:
            Datastore.from_run(out, model.vocab_size, cfg.model).save(ds_path)
            _log(f"datastore drafter: {ds_path} ({ds_path.stat().st_size / 2**20:.1f} MiB; --drafter {ds_path})")
        except ValueError as e:  # no training sequence (a data budget cut them all)
            _log(f"no datastore drafter: {e}")
    t1 = time.perf_counter()
    if cfg.data_only:
        _add_timings(out, {"data": t1 - t0})
        return {"configs": {}}
    train, val = stage_features(cfg, model, seqs, layers)
    t2 = time.perf_counter()
    stage_train(cfg, model, train, val)
    top_k_teacher_forced(cfg, model, val)
    t3 = time.perf_counter()
    del train, val
    del model
    select_top_k(cfg, val_prompts)
    select = stage_eval(cfg, val_prompts, "select")
    res = stage_eval(cfg, eval_prompts, "eval", only=sorted({"plain", "mtp", "ngram", chosen_variant(select)}))
    if cfg.sampled_temperature > 0:  # the same choice for sampled requests (acceptance differs there)
        variants = [n for n in select["configs"] if n != "mtp_untrained"]
        sel_t = stage_eval(cfg, val_prompts, "select_sampled", only=variants, temperature=cfg.sampled_temperature)
        stage_eval(cfg, eval_prompts, "eval_sampled", only=sorted({"plain", "mtp", "ngram", chosen_variant(sel_t)}),
                   temperature=cfg.sampled_temperature)
    t4 = time.perf_counter()
    _log(f"stage seconds this run: data {t1 - t0:.0f}, features {t2 - t1:.0f}, train {t3 - t2:.0f}, eval {t4 - t3:.0f}")
    _add_timings(out, {"data": t1 - t0, "features": t2 - t1, "train": t3 - t2, "eval": t4 - t3})
    return res


def _add_timings(out: Path, stages: dict) -> None:
    # wall time per stage, summed over resumed runs (a stage that was already done adds ~0)
    tpath = out / "timings.json"
    tim = json.loads(tpath.read_text()) if tpath.exists() else {}
    note = tim.pop("note", None)
    for k, v in stages.items():
        tim[k] = round(tim.get(k, 0.0) + v, 1)
    if note:
        tim["note"] = note
    tpath.write_text(json.dumps(tim, indent=1))


def ship(cfg: TrainConfig, dest: str | Path) -> bool:
    """Copy the trained drafter to dest with a model card, only if, on the validation
    prompts, it beat the untrained drafter and, combined with prompt lookup (what
    `--drafter auto` runs), beat prompt lookup alone (auto's fallback). The card reports
    the eval prompts' figures."""
    out = Path(cfg.out)
    sel = json.loads((out / "select.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    c = sel["configs"]
    if c["mtp"]["tau"] <= c["mtp_untrained"]["tau"]:
        _log(f"not shipped: validation tau {c['mtp']['tau']} <= untrained {c['mtp_untrained']['tau']}")
        return False
    best = chosen_variant(sel)
    if best.partition(LEN_TAG)[0] in ("ngram", "plain"):
        _log(f"not shipped: on validation {'prompt lookup alone' if best == 'ngram' else 'plain decoding'} "
             f"({c[best]['decode_tokens_per_s']} tok/s) is faster than every variant with the drafter")
        return False
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(out / "drafter" / f, dest / f)
    auto = auto_variant(best, cfg.min_match, cfg.draft_len)
    if (out / "select_sampled.json").exists():
        best_t = chosen_variant(json.loads((out / "select_sampled.json").read_text()))
        if best_t != best:
            auto["sampled"] = dict(auto_variant(best_t, cfg.min_match, cfg.draft_len),
                                   temperature=cfg.sampled_temperature)
    (dest / "auto.json").write_text(json.dumps(auto, indent=1))
    (dest / "README.md").write_text(model_card(cfg, ev, sel))
    _log(f"shipped to {dest}")
    return True


def auto_variant(name: str, min_match: int, draft_len: int) -> dict:
    """auto.json's entry for a variant name of the evaluation: plain | mtp | ngram | combined[@gate] |
    fallback:L, with " k=K" where it ran at a draft length K other than `draft_len`."""
    name, _, k = name.partition(LEN_TAG)
    if name == "plain":
        return {"drafter": "none", "chosen_from": name}
    if name.startswith("fallback:"):
        entry = {"drafter": "combined", "min_confidence": 0.0, "min_match": FALLBACK_MIN_MATCH,
                 "mtp_len": int(name.partition(":")[2])}
    else:
        entry = {"drafter": name.partition("@")[0], "min_confidence": float(name.partition("@")[2] or 0.0),
                 "min_match": min_match}
    return dict(entry, draft_len=int(k or draft_len), chosen_from=name + (LEN_TAG + k if k else ""))


def _timings(out: Path) -> str:
    p = out / "timings.json"
    if not p.exists():
        return "not recorded"
    t = json.loads(p.read_text())
    note = t.pop("note", "")  # free text about the run (e.g. an interruption), kept with the figures
    parts = ", ".join(f"{k} {v / 60:.0f} min" for k, v in t.items())
    return f"{parts} (total {sum(t.values()) / 60:.0f} min)" + (f"; {note}" if note else "")


def _generated_text(data: dict) -> str:
    """How many tokens the target wrote for the data, and how fast (the data stage's last run)."""
    if "target_tokens" not in data:  # a data stage from before it counted them
        return ""
    rate = data.get("tokens_per_s")
    how = (f" at {rate:,.0f} tok/s in the data stage's last run, up to {data.get('gen_batch', '?')} rows per forward"
           if rate else "")
    return f"; {data['target_tokens']:,} of them written by the target{how}"


def _recall_text(out: Path, tl: dict, dcfg: dict) -> str:
    """How the centroid top-k was chosen (the real loop's tok/s per k) and what the
    teacher-forced validation measured at it, for the model card."""
    t, k = tl.get("top_k_tuning", {}), str(dcfg.get("centroid_intermediate_top_k"))
    text = ""
    sel_path = out / "select_top_k.json"
    if sel_path.exists():
        sel = json.loads(sel_path.read_text())
        speeds = ", ".join(f"{c}: {sel['configs'][f'mtp top-k={c}']['speedup_vs_plain']:.2f}x"
                           for c in sel["candidates"])
        text = (f" Chosen in the real loop, MTP alone on {sel['prompts']} validation prompts, greedy, "
                f"k={sel['draft_len']}, against plain decoding (`select_top_k.json`): {speeds}.")
    if k in t.get("val_step1_cluster_recall_by_top_k", {}):
        text += (f" Validation, teacher-forced, first drafted token: its label's cluster is among them "
                 f"{t['val_step1_cluster_recall_by_top_k'][k]:.0%} of the time, the drafted token is right "
                 f"{t['val_step1_acc_by_top_k'][k]:.0%}.")
    return text


def model_card(cfg: TrainConfig, ev: dict, sel: dict) -> str:
    from ..bench import machine_info

    out = Path(cfg.out)
    data = json.loads((out / "data" / "DONE.json").read_text())
    tl = json.loads((out / "train_log.json").read_text())
    dcfg = json.loads((out / "drafter" / "config.json").read_text())
    scale = dcfg.get("input_embed_scale", 1.0)
    scaled = f" x {scale:g}" if scale != 1.0 else ""
    rows = []
    for n, r in ev["configs"].items():
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) or "-"
        rows.append(f"| {n} | {r['prompts']} | {r['tau']:.2f} | {acc} | {r['decode_tokens_per_s']:.1f} | "
                    f"{r.get('speedup_vs_plain', 1.0):.2f} | {r.get('greedy_equal_to_plain', '-')} |")
    size = (out / "drafter" / "model.safetensors").stat().st_size / 1e6
    sampled = ""
    if (out / "eval_sampled.json").exists():
        ev_t = json.loads((out / "eval_sampled.json").read_text())
        sel_t = json.loads((out / "select_sampled.json").read_text())
        best_t = chosen_variant(sel_t)
        rows_t = [f"| {n} | {r['prompts']} | {r['tau']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                  f"{r.get('speedup_vs_plain', 1.0):.2f} |" for n, r in ev_t["configs"].items()]
        sampled = f"""
## Evaluation at temperature {ev_t['temperature']} (eval prompts, the drafter sampling from its own distribution)

`auto`'s variant for sampled requests, chosen on the validation prompts at this temperature
(`select_sampled.json`): {best_t}{" (no draft: plain decoding was fastest)" if best_t == "plain" else ""}.

| drafter | prompts | tau | decode tok/s | vs plain |
|---|---|---|---|---|
{chr(10).join(rows_t)}
"""
    # the lengths the selection ran (a run resumed from before select_draft_lens ran one)
    lens_tried = ", ".join(map(str, sorted({r.get("draft_len", cfg.draft_len) for r in sel["configs"].values()})))
    defaults = asdict(TrainConfig(model=cfg.model, out=cfg.out))
    changed = " ".join(f"--set {k}='{json.dumps(v)}'" for k, v in asdict(cfg).items()
                       if k not in ("model", "out") and json.dumps(v) != json.dumps(defaults[k]))
    command = f"mtpdraft train --model {cfg.model} --out RUN {changed}".strip()
    user_text = (f"\n  Also the lines of `{Path(cfg.data_file).name}`, teacher-forced (labels: the target's argmax)."
                 if cfg.data_file else "")
    w = cfg.distill_weight
    token_loss = ("cross-entropy on the target's greedy tokens" if not w else
                  f"{1 - w:g} x cross-entropy on the target's greedy tokens + {w:g} x cross-entropy to the "
                  "target's own distribution over the same candidates (distillation)")
    init_text = (f"\n- Started from the drafter in `{cfg.init_from}` (its own card says how that one was trained); "
                 "the data, wall time and iterations here are this run's only." if cfg.init_from else "")
    extra_text = (f"; plus the training-only prompts of `{Path(cfg.extra_prompts_file).name}`"
                  if cfg.extra_prompts_file else "")
    sampled_rows = (f", and {cfg.sampled_per_prompt} rows per prompt sampled throughout (labels: the target's argmax)"
                    if cfg.sampled_per_prompt else "")
    return f"""# MTP drafter for {cfg.model}

A multi-token-prediction drafter in mtpdraft's format (`model_type: mtpdraft_mtp`),
trained by `mtpdraft train` on text the target wrote itself. Load it with
`--drafter auto` (it is the shipped drafter of `{cfg.model}`) or
`mtpdraft.drafters.make_drafter(PATH, target)`.

## Architecture
- {len(dcfg['layer_types'])} query-only layer(s) ({', '.join(dcfg['layer_types'])}), width {dcfg['hidden_size']},
  MLP {dcfg['intermediate_size']}, {dcfg['num_attention_heads']} query heads over the target's cached K/V
  (no cache of its own); input: [target embedding of the last token{scaled}, last hidden state].
- Output head: the target's own output embeddings (`tie_output_to_target`), read by the
  post-projected state h' (width {dcfg['backbone_hidden_size']}); clustered: {dcfg['num_centroids']} equal clusters
  of the target's output-embedding rows (balanced recursive bisection), the top
  {dcfg['centroid_intermediate_top_k']} scored by the centroids are searched for the argmax.{_recall_text(out, tl, dcfg)}
- {tl['params']:,} parameters; weights stored in bf16 ({size:.1f} MB).

## Training
- Data: {data['sequences']} sequences ({data['total_tokens']:,} tokens, {data['trainable_positions']:,} trained positions{_generated_text(data)}),
  written by the target ({cfg.dtype}) from the project's prompt set
  (`mtpdraft/data/train_prompts.jsonl`, validation and eval prompts excluded{extra_text}) and from BOS: greedy
  continuations, many after {cfg.sample_first} tokens sampled at temperature {cfg.temperature}{sampled_rows}; {cfg.new_tokens} new tokens each.{user_text}
- Objective: {cfg.draft_steps}-step unrolled teacher-forced drafting (the drafter's own h carried
  between steps), {token_loss} with a reduced softmax
  (label cluster + {cfg.extra_clusters} competing clusters) + centroid cross-entropy
  + {cfg.hidden_weight} x relative MSE of h' to the target's next hidden state; step weights {cfg.step_decay}^(j-1).
- {tl['iterations']} AdamW iterations ({tl['epochs']} epochs), lr {cfg.lr} cosine, seed {cfg.seed}.{init_text}
- Wall time on {machine_info()['cpu']} ({torch.get_num_threads()} threads): {_timings(out)}.
- Command (every figure here, the eval table included, comes from it): `{command}`.

## Evaluation (eval prompts, greedy, real speculative loop, {ev.get('weights', ev['dtype'])}, k={ev['draft_len']} \
unless named "k=K", {ev['new_tokens']} new tokens)

Eval prompts share no passage with the training or validation prompts and took no part in
any choice: `auto`'s variant ({chosen_variant(sel)}) and its draft length (of {lens_tried}),
the centroid top-k and the schedule were chosen on the validation prompts (`select.json` in the run directory).

| drafter | prompts | tau | acceptance by position | decode tok/s | vs plain | greedy == plain |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

`combined` = n-gram lookup when it continues a match of >= {cfg.min_match} tokens, else this drafter;
`combined@g` also ends an MTP draft at the first token whose probability is below g; `fallback:L` =
n-gram lookup on any match, else an MTP draft of at most L tokens. `--drafter auto` runs whichever
of MTP alone, prompt lookup alone, the combined variants and plain decoding (no draft) was fastest
on the validation prompts (settings in `auto.json`).
Measured on a shared 2-core CPU; timings are noisy. Where the text repeats itself (base-model
greedy text loops a lot), prompt lookup (n-gram) is hard to beat.
{sampled}"""
