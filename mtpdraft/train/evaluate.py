"""Stage 4: tau and speed measured by the real speculative loop.

For every validation or eval prompt (never trained on) the configurations run back to
back in a rotating order (so drift of a shared machine hits all of them alike):
plain decoding, each drafter. Greedy outputs must equal plain decoding's. Each
configuration first runs a few untimed tokens, so one-time work (the cluster-ordered
head table, the native drafting step) is not charged to whichever runs first.
"""

from __future__ import annotations

import time
from typing import Callable

from ..config import SamplingParams, SpecParams, Stats
from ..decoding.engine import eos_ids_of, generate
from ..models.base import CausalLM


def _sum_stats(parts: list[Stats]) -> dict:
    tot = Stats()
    for s in parts:
        tot.tokens += s.tokens
        tot.decode_tokens += s.decode_tokens
        tot.cycles += s.cycles
        tot.decode_s += s.decode_s
        tot.draft_s += s.draft_s
        tot.verify_s += s.verify_s
        for i, (p, a) in enumerate(zip(s.proposed_by_pos, s.accepted_by_pos)):
            if i >= len(tot.proposed_by_pos):
                tot.proposed_by_pos.append(0)
                tot.accepted_by_pos.append(0)
            tot.proposed_by_pos[i] += p
            tot.accepted_by_pos[i] += a
    return {
        "tau": round(tot.mean_accepted_tokens, 4),
        "acceptance_by_position": [round(a, 4) for a in tot.acceptance_by_position],
        "proposed_by_position": tot.proposed_by_pos,
        "decode_tokens": tot.decode_tokens, "cycles": tot.cycles,
        "decode_tokens_per_s": round(tot.tokens_per_s, 3),
        "draft_s": round(tot.draft_s, 3), "verify_s": round(tot.verify_s, 3), "decode_s": round(tot.decode_s, 3),
    }


LEN_TAG = " k="  # "combined@0.6 k=8": a configuration run at draft length 8


def at_draft_lens(drafters: dict[str, Callable[[], object]], lens: list[int], fixed: tuple[str, ...] = ("plain",)
                  ) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """Every configuration not in `fixed` once per draft length, named "NAME k=K" (those in
    `fixed` once, as they are) -> (configurations, evaluate's draft_lens), so that lengths
    compare within one run."""
    out, draft_lens = {}, {}
    for n, f in drafters.items():
        for k in ([None] if n in fixed else lens):
            name = n if k is None else f"{n}{LEN_TAG}{k}"
            out[name] = f
            if k is not None:
                draft_lens[name] = k
    return out, draft_lens


def evaluate(model: CausalLM, tokenizer, prompts: list[list[int]], drafters: dict[str, Callable[[], object]],
             new_tokens: int, draft_len: int = 4, only_first: dict[str, int] | None = None,
             progress: bool = True, temperature: float = 0.0, draft_lens: dict[str, int] | None = None) -> dict:
    """drafters: name -> factory of a fresh drafter per prompt (None = plain decoding).
    only_first: name -> run that configuration on the first N prompts only. temperature > 0:
    sampled (seed = the prompt's index), outputs not compared. draft_lens: name -> that
    configuration's draft length (others: draft_len), so lengths compare within one run."""
    from tqdm import tqdm

    sp = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, ignore_eos=False)
    specs = {n: SpecParams(draft_len=(draft_lens or {}).get(n, draft_len)) for n in drafters}
    eos = eos_ids_of(model, tokenizer)
    names = list(drafters)
    stats: dict[str, list[Stats]] = {n: [] for n in names}
    mismatches: dict[str, int] = {n: 0 for n in names}
    compared: dict[str, int] = {n: 0 for n in names}
    extra: dict[str, dict] = {}
    if prompts:  # untimed: a short generation per configuration builds what a drafter builds on first use
        warm = SamplingParams(max_new_tokens=min(8, new_tokens), temperature=temperature, ignore_eos=True, seed=0)
        for n in names:
            list(generate(model, prompts[0], warm, drafter=drafters[n](), spec=specs[n]))
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="eval", disable=not progress, dynamic_ncols=True)
    for pi, ids in enumerate(prompts):
        if temperature > 0:  # every configuration samples with the prompt's seed
            sp = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, ignore_eos=False, seed=pi)
        outs = {}
        order = names[pi % len(names):] + names[:pi % len(names)]  # rotate: no config always runs first
        for n in order:
            if only_first and n in only_first and pi >= only_first[n]:
                continue
            d = drafters[n]()
            st = Stats()
            from ..decoding.stops import StopChecker

            stopper = StopChecker(sp, eos, tokenizer)
            outs[n] = list(generate(model, ids, sp, drafter=d, spec=specs[n], stats=st, stopper=stopper))
            stats[n].append(st)
            if hasattr(d, "rounds"):
                r = extra.setdefault(n, {"rounds": {}})["rounds"]
                for k, v in d.rounds.items():
                    r[k] = r.get(k, 0) + v
        if "plain" in outs and temperature == 0:
            for n, o in outs.items():
                if n != "plain":
                    compared[n] += 1
                    mismatches[n] += o != outs["plain"]
        bar.update(1)
        bar.set_postfix({n: round(_sum_stats(stats[n])["tau"], 2) for n in names if n != "plain" and stats[n]})
    bar.close()
    res = {"prompts": len(prompts), "new_tokens": new_tokens, "draft_len": draft_len, "temperature": temperature,
           "seconds": round(time.perf_counter() - t0, 1), "configs": {}}
    for n in names:
        r = _sum_stats(stats[n])
        r["prompts"] = len(stats[n])
        if draft_lens and n in draft_lens:
            r["draft_len"] = draft_lens[n]
        if n != "plain" and temperature == 0:
            r["greedy_equal_to_plain"] = f"{compared[n] - mismatches[n]}/{compared[n]}"
        r.update(extra.get(n, {}))
        res["configs"][n] = r
    plain = res["configs"].get("plain", {}).get("decode_tokens_per_s")
    if plain:
        for n, r in res["configs"].items():
            r["speedup_vs_plain"] = round(r["decode_tokens_per_s"] / plain, 3)
    return res
