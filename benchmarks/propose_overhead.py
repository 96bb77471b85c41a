"""The MTP drafter's per-draft Python overhead, before and after 2026-12-07, in one run.

Before, every propose() walked the drafter's modules to key its native step (parameters(),
buffers()) and the target's 30 layers for the source layer; now both are kept (MTPDrafter.
native_step, source_layers). The previous two functions are kept here as the baseline and
patched in per configuration (evaluate() rotates the configurations per prompt):

    python benchmarks/propose_overhead.py smollm2-135m-instruct mtpdraft/drafters/shipped/smollm2-135m-instruct 1,2 34
    python benchmarks/propose_overhead.py gemma-3-270m mtpdraft/drafters/shipped/gemma-3-270m 6 34

Arguments: model, drafter directory, draft lengths, number of validation prompts.
Measured figures: benchmarks/results/propose_overhead.md.
"""
import sys
import weakref

from mtpdraft import kernels, load
from mtpdraft.drafters import make_drafter
from mtpdraft.drafters import mtp as M
from mtpdraft.drafters.combined import CombinedDrafter
from mtpdraft.train.data import encode_prompt, uses_chat
from mtpdraft.train.evaluate import evaluate, at_draft_lens
from mtpdraft.train.train import TrainConfig

NEW_NATIVE, NEW_SRC = M.MTPDrafter.native_step, M.MTPDrafter.source_layers

def old_native(self, target):
    tables = [target.embed_table, self.output_table(target)]
    tensors = [*self.parameters(), *self.buffers(), *(p for t in tables for p in getattr(t, "parts", [t]))]
    key = (repr(self.config), *((t.data_ptr(), kernels.version(t)) for t in tensors))
    cached = self.__dict__.get("_native_old")
    if cached is None or cached[0]() is not target or cached[1] != key:
        cached = self.__dict__["_native_old"] = (weakref.ref(target), key, self._build_native(target))
    return cached[2]

def old_src(self, target):
    return M.source_layers([layer.layer_type for layer in self.model.layers], target)

def patch(old):
    M.MTPDrafter.native_step = old_native if old else NEW_NATIVE
    M.MTPDrafter.source_layers = old_src if old else NEW_SRC

if len(sys.argv) != 5:
    sys.exit(__doc__)
model_name, ddir, ks, nprompt = sys.argv[1], sys.argv[2], [int(k) for k in sys.argv[3].split(",")], int(sys.argv[4])
model, tok = load(model_name, "auto")
chat = uses_chat(tok, None)
_, val, _ = TrainConfig().prompt_sets()
prompts = [encode_prompt(tok, p["prompt"], chat, TrainConfig.max_prompt_tokens) for p in val[:nprompt]]
src_old, src_new = make_drafter(ddir, model), make_drafter(ddir, model)
def mk(old, f):
    def fac():
        patch(old)
        return f()
    return fac
confs = {"plain": mk(False, lambda: None)}
for tag, old, src in (("old", True, src_old), ("new", False, src_new)):
    confs[f"mtp {tag}"] = mk(old, lambda src=src: src)
    confs[f"fallback:1 {tag}"] = mk(old, lambda src=src: CombinedDrafter.fallback(src, 1))
confs, lens = at_draft_lens(confs, ks)
res = evaluate(model, tok, prompts, confs, 128, ks[0], draft_lens=lens, progress=False)
p = res["configs"]["plain"]["decode_tokens_per_s"]
for n, r in res["configs"].items():
    print(f"{n:24s} tau {r['tau']:.2f}  {r['decode_tokens_per_s']:.1f} tok/s  {r['decode_tokens_per_s']/p:.3f}x  {r.get('greedy_equal_to_plain','-')}")
