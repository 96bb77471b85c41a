"""An MTP drafter with Q8_0 matrices (what `make_drafter` loads for a quantized target, since
2026-12-07) against the same drafter in bf16, in one run with the configurations rotated per prompt:

    python benchmarks/drafter_weights.py smollm2-135m-instruct mtpdraft/drafters/shipped/smollm2-135m-instruct 1,2 34
    python benchmarks/drafter_weights.py gemma-3-270m mtpdraft/drafters/shipped/gemma-3-270m 6 34

Arguments: model, drafter directory, draft lengths, number of validation prompts (the split
`mtpdraft train` makes with its default settings). Each drafter runs alone and as
fallback:1 (prompt lookup on any n-gram match, else one MTP token); greedy, 128 new tokens.
"drafting" is the decoding loop's time in propose() per cycle (a forward of the target between
drafts, as in real use).
Measured figures: benchmarks/results/drafter_weights.md.
"""
import sys

from mtpdraft import load
from mtpdraft.drafters import MTPDrafter, MTPDraftSource, make_drafter
from mtpdraft.drafters.combined import CombinedDrafter
from mtpdraft.train.data import encode_prompt, uses_chat
from mtpdraft.train.evaluate import at_draft_lens, evaluate
from mtpdraft.train.train import TrainConfig

if len(sys.argv) != 5:
    sys.exit(__doc__)
model_name, ddir, ks, nprompt = sys.argv[1], sys.argv[2], [int(k) for k in sys.argv[3].split(",")], int(sys.argv[4])
model, tok = load(model_name, "auto")
if not model.quantized:
    sys.exit(f"{model_name} loaded with {model.weights_format} weights: the drafter is only quantized for quantized targets")
chat = uses_chat(tok, None)
_, val, _ = TrainConfig().prompt_sets()
prompts = [encode_prompt(tok, p["prompt"], chat, TrainConfig.max_prompt_tokens) for p in val[:nprompt]]
quant = make_drafter(ddir, model)
bf16 = MTPDraftSource(MTPDrafter.load(ddir, model.dtype))
assert quant.drafter.quantized and not bf16.drafter.quantized
confs = {"plain": lambda: None}
for tag, src in (("q8_0", quant), ("bf16", bf16)):
    confs[f"mtp {tag}"] = lambda src=src: src
    confs[f"fallback:1 {tag}"] = lambda src=src: CombinedDrafter.fallback(src, 1)
confs, lens = at_draft_lens(confs, ks)
res = evaluate(model, tok, prompts, confs, 128, ks[0], draft_lens=lens, progress=False)
p = res["configs"]["plain"]["decode_tokens_per_s"]
print(f"{model_name} ({model.weights_format}), {len(prompts)} validation prompts, greedy, 128 new tokens")
for n, r in res["configs"].items():
    print(f"{n:24s} tau {r['tau']:.2f}  {r['decode_tokens_per_s']:.1f} tok/s  {r['decode_tokens_per_s'] / p:.3f}x  "
          f"{r.get('greedy_equal_to_plain', '-'):6s} drafting {1e3 * r['draft_s'] / max(1, r['cycles']):.3f} ms/cycle")
