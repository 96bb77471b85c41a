"""Teacher-forced A/B: does an EAGLE-3-style input of intermediate target layers help a
SmolLM2 drafter? Same data subset, seed, batches and iterations for both arms; "fuse" adds
a matrix [D, 2D], zero at the start, so that the first drafting step reads
h + fuse([rms(x_9); rms(x_19)]), x_i the residual stream after target layer i (0-based).
The trainer is `mtpdraft.train.train.stage_train` itself, patched around the extra input.

    python benchmarks/multilayer_features.py RUN OUT extract 8000      # 54 min beside another job
    python benchmarks/multilayer_features.py RUN OUT train base 1200   # ~19 min each
    python benchmarks/multilayer_features.py RUN OUT train fuse 1200

RUN: a finished `mtpdraft train --model smollm2-135m-instruct` run directory (its features and
config.json); OUT: where the subset, the extra features (~4.5 GB for 8000 sequences) and the
arms' logs go. Measured: benchmarks/results/multilayer_features.md.
"""
import json
import random
import sys
import time
from pathlib import Path
import torch
import torch.nn.functional as F
import mtpdraft
from mtpdraft.train import train as T
from mtpdraft.train.features import Features
torch.set_num_threads(2)
RUN, OUT = Path(sys.argv[1]), Path(sys.argv[2]); L = (9, 19)
OUT.mkdir(parents=True, exist_ok=True)
sys.argv = sys.argv[:1] + sys.argv[3:]

def load_cfg(out, iters):
    c = json.loads((RUN / "config.json").read_text())
    c.update(out=str(out), max_iters=iters, train_deadline=None, train_budget_s=0.0, eval_every=100, ckpt_every=10**9)
    fields = T.TrainConfig.__dataclass_fields__
    return T.TrainConfig(**{k: (tuple(v) if isinstance(v, list) and isinstance(getattr(T.TrainConfig, k, None), tuple) else v)
                            for k, v in c.items() if k in fields})

@torch.inference_mode()
def extras(model, f: Features, batch_tokens=4096):
    n = f.num_sequences; D = model.args.hidden_size
    out = torch.zeros(int(f.offsets[-1]), 2 * D, dtype=torch.bfloat16)
    order = sorted(range(n), key=f.length); i = 0; t0 = time.time()
    while i < n:
        grp = [order[i]]
        while i + len(grp) < n and (len(grp) + 1) * f.length(order[i + len(grp)]) <= batch_tokens:
            grp.append(order[i + len(grp)])
        Tn = max(f.length(g) for g in grp)
        toks = torch.zeros(len(grp), Tn, dtype=torch.long)
        for b, g in enumerate(grp):
            s = int(f.offsets[g]); toks[b, :f.length(g)] = f.tokens[s:s + f.length(g)]
        cache = model.new_cache(len(grp), Tn + 1, max_chunk=Tn)
        x = model.embed(toks); pos = cache.positions(Tn); keep = []
        for li, (blk, lc) in enumerate(zip(model.model.layers, cache.layers)):
            x = blk(x, pos, lc)
            if li in L:
                keep.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        e = torch.cat(keep, -1).to(torch.bfloat16)
        for b, g in enumerate(grp):
            s = int(f.offsets[g]); out[s:s + f.length(g)] = e[b, :f.length(g)]
        i += len(grp)
        print(f"\r{i}/{n} {time.time() - t0:.0f}s", end="", flush=True)
    print()
    return out

if sys.argv[1] == "extract":
    nseq = int(sys.argv[2])
    model, _ = mtpdraft.load("smollm2-135m-instruct", "auto")
    tr = Features.load(RUN / "features/train.pt", mmap=True)
    rng = random.Random(0); idx = sorted(rng.sample(range(tr.num_sequences), nseq))
    sub = tr.select(idx); del tr
    sub = Features(sub.offsets, sub.tokens.clone(), sub.labels.clone(), sub.train_from.clone(), sub.hidden.clone(),
                   [(k.clone(), v.clone()) for k, v in sub.kv], sub.layers)
    print("train positions", int(sub.offsets[-1]))
    torch.save(extras(model, sub), OUT / "train_extra.pt"); sub.save(OUT / "train_sub.pt")
    va = Features.load(RUN / "features/val.pt")
    print("val positions", int(va.offsets[-1]))
    torch.save(extras(model, va), OUT / "val_extra.pt")
    sys.exit()

arm, iters = sys.argv[2], int(sys.argv[3])
model, _ = mtpdraft.load("smollm2-135m-instruct", "auto")
D = model.args.hidden_size
tr, va = Features.load(OUT / "train_sub.pt"), Features.load(RUN / "features/val.pt")
tr.hidden = torch.cat([tr.hidden, torch.load(OUT / "train_extra.pt")], -1)
va.hidden = torch.cat([va.hidden, torch.load(OUT / "val_extra.pt")], -1)
CUR = {}
orig_batch = Features.batch
def batch(self, idx):
    b = orig_batch(self, idx); full = b["hidden"]; b["hidden"] = full[..., :D]; CUR["x"] = full[..., D:]; return b
Features.batch = batch
orig_unrolled = T.unrolled
def unrolled(drafter, target, seq, h0, kv, steps):
    fuse = getattr(drafter, "fuse", None)
    if fuse is not None:
        ex = CUR["x"]
        h0 = h0.float() + F.linear(ex.to(fuse.dtype) if not torch.is_autocast_enabled("cpu") else ex, fuse)
    return orig_unrolled(drafter, target, seq, h0, kv, steps)
T.unrolled = unrolled
orig_init = T.initial_drafter
def initial(cfg, target):
    d = orig_init(cfg, target)
    if arm == "fuse":
        d.fuse = torch.nn.Parameter(torch.zeros(D, 2 * D), requires_grad=False)
    return d
T.initial_drafter = initial
T.save_drafter = lambda d, p, dtype=None: p  # scratch: nothing to keep
out = OUT / f"run_{arm}_{iters}"; out.mkdir(exist_ok=True)
for p in out.glob("*"):
    p.unlink() if p.is_file() else None
cfg = load_cfg(out, iters)
t0 = time.time()
T.stage_train(cfg, model, tr, va)
log = json.loads((out / "train_log.json").read_text())["log"]
print(arm, iters, f"{time.time() - t0:.0f}s", [(r["it"], r["val_tau"], r["val_step_acc"][0]) for r in log])
