"""Run the benchmark: plain and speculative decoding interleaved per prompt, in one process."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import DEFAULT_SAMPLING, DEFAULT_WEIGHTS
from ..registry import DEFAULT_MODEL
from .prompts import Prompt, load_prompts
from .stats import PromptRecord, RunStats, combine, summarize

COMPARE_CHOICES = ("hf", "llamacpp")


def parse_compare(value: str | Sequence[str] | None) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for x in (i.strip().lower() for i in items):
        x = {"transformers": "hf", "hf_transformers": "hf", "llama.cpp": "llamacpp", "llama_cpp": "llamacpp"}.get(x, x)
        if x and x not in COMPARE_CHOICES:
            raise ValueError(f"unknown --compare value {x!r}: use a comma-separated list of {', '.join(COMPARE_CHOICES)}")
        if x and x not in out:
            out.append(x)
    return out


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    from .. import __version__

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": tf_version, "mtpdraft": __version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


@dataclass
class Turn:
    context: list[int]  # prompt ids the turn was generated from
    output: list[int]  # generated ids
    text: str


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    run: RunStats = field(default_factory=RunStats)

    @property
    def outputs(self) -> list[list[int]]:
        return [t.output for t in self.turns]


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def run_conversation(model, tok, prompt: Prompt, sp, *, drafter=None, spec=None, eos_ids=None) -> Conversation:
    """Generate every turn of `prompt` in sequence, each turn seeing the earlier ones.

    With a chat template the turns are user messages and the generations the
    assistant's; without one the turns are concatenated as plain text (separated
    by a blank line) after the previous context and its generation.
    """
    from ..config import Stats
    from ..decoding.engine import eos_ids_of, generate
    from ..decoding.stops import StopChecker

    eos_ids = eos_ids_of(model, tok) if eos_ids is None else eos_ids
    chat = has_chat_template(tok)
    messages: list[dict] = []
    history: list[int] = []
    conv = Conversation()
    runs = []
    for i, turn in enumerate(prompt.turns):
        if chat:
            messages.append({"role": "user", "content": turn})
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ctx = tok(text, add_special_tokens=False).input_ids
        elif i == 0:
            ctx = tok(turn).input_ids
        else:
            ctx = history + tok("\n\n" + turn, add_special_tokens=False).input_ids
        stats = Stats()
        stopper = StopChecker(sp, eos_ids, tok)
        out = list(generate(model, ctx, sp, drafter=drafter, spec=spec, tokenizer=tok, stats=stats, stopper=stopper))
        reply = stopper.text()
        conv.turns.append(Turn(ctx, out, reply))
        runs.append(RunStats.from_stats(stats))
        if chat:
            messages.append({"role": "assistant", "content": reply})
        else:
            kept = list(out)
            while kept and kept[-1] in eos_ids:
                kept.pop()
            history = ctx + kept
    conv.run = combine(runs)
    return conv


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, unit="prompt", dynamic_ncols=True)


def run_bench(model: str = DEFAULT_MODEL, drafter: str = "ngram", prompts: str | Path | Sequence[Prompt] | None = None,
              *, limit: int | None = None, max_new_tokens: int = DEFAULT_SAMPLING.max_new_tokens,
              temperature: float = DEFAULT_SAMPLING.temperature, dtype: str = DEFAULT_WEIGHTS,
              draft_len: int | None = None, adaptive: bool = False, compare: str | Sequence[str] | None = None,
              seed: int | None = None, warmup: bool = True, progress: bool = True, log=None) -> dict:
    """Benchmark `drafter` against plain decoding of `model`; returns the result dict (the --json content).

    `result["identical_outputs"]["mismatched_ids"]` lists prompts whose greedy
    speculative output differs from plain decoding.
    """
    import torch

    from .. import load
    from ..config import DEFAULT_DRAFT_LEN, SamplingParams, SpecParams
    from ..decoding.engine import eos_ids_of
    from ..drafters import ByTemperature, draft_len_for, for_request, make_drafter

    log = log or (lambda msg: print(f"mtpdraft bench: {msg}", file=sys.stderr, flush=True))
    compare = parse_compare(compare)
    if prompts is None or isinstance(prompts, (str, Path)):
        prompts = load_prompts(prompts, limit)
    else:
        prompts = list(prompts)[:limit] if limit else list(prompts)
    if not prompts:
        raise ValueError("no prompts to run")
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    spec = SpecParams(**({"draft_len": draft_len} if draft_len else {}), adaptive=adaptive)
    if seed is not None:
        torch.manual_seed(seed)

    t_load = time.perf_counter()
    lm, tok = load(model, dtype)
    dr = make_drafter(drafter, lm, lm.name)
    load_s = time.perf_counter() - t_load
    runs = for_request(dr, sp)  # what the speculative run drafts with at this temperature
    if runs is None:
        log(f"drafter {drafter!r} resolves to none for {lm.name} at temperature {temperature}: "
            "the speculative run is plain decoding")
    # the draft length the speculative run uses (auto.json's own where the caller set none)
    k = draft_len_for(runs, sp, spec.draft_len) or spec.draft_len or DEFAULT_DRAFT_LEN
    own = runs.choice(sp)[1] if isinstance(runs, ByTemperature) else None
    eos = eos_ids_of(lm, tok)

    hf = llama = None
    if "hf" in compare:
        from .compare import HFBaseline
        # transformers runs the dense checkpoint: fp32 where we run fp32, else bf16
        hf = HFBaseline(lm.path, "fp32" if lm.weights_format == "fp32" else "bf16", sp, k, eos,
                        log=log)
    if "llamacpp" in compare:
        from .compare import LlamaCppBaseline
        llama = LlamaCppBaseline.find(model, lm, sp, k, log=log)

    if warmup:  # first-call costs (allocation, kernel builds, caches) stay out of the timings
        wsp = SamplingParams(max_new_tokens=min(16, max_new_tokens), temperature=temperature, seed=seed)
        first = Prompt(id="warmup", turns=prompts[0].turns[:1])
        w = run_conversation(lm, tok, first, wsp, eos_ids=eos)
        run_conversation(lm, tok, first, wsp, drafter=dr, spec=spec, eos_ids=eos)
        if hf is not None:
            hf.warmup(w.turns[0].context, wsp.max_new_tokens)

    records: list[PromptRecord] = []
    details = []
    for p in _progress(prompts, len(prompts), progress, f"bench {lm.name} {drafter}"):
        plain = run_conversation(lm, tok, p, sp, eos_ids=eos)
        specc = run_conversation(lm, tok, p, sp, drafter=dr, spec=spec, eos_ids=eos)
        identical = plain.outputs == specc.outputs if sp.greedy else None
        records.append(PromptRecord(p.id, p.category, plain.run, specc.run, identical, len(p.turns)))
        contexts = [t.context for t in plain.turns]  # the comparisons replay the plain run's contexts
        if hf is not None:
            hf.run(p, contexts, plain.outputs)
        if llama is not None:
            llama.run(p, contexts)
        details.append({"id": p.id, "category": p.category, "turns": len(p.turns),
                        "prompt_tokens": [len(c) for c in contexts],
                        "baseline": {"decode_tokens": plain.run.decode_tokens, "decode_s": plain.run.decode_s,
                                     "tokens_per_s": plain.run.tokens_per_s},
                        "speculative": {"decode_tokens": specc.run.decode_tokens, "decode_s": specc.run.decode_s,
                                        "tokens_per_s": specc.run.tokens_per_s,
                                        "mean_accepted_tokens": specc.run.mean_accepted_tokens},
                        "identical": identical, "output": plain.turns[-1].text[:200]})

    result = {"model": lm.name, "drafter": drafter, "dtype": dtype, "weights": lm.weights_format,
              "num_prompts": len(records),
              "max_new_tokens": max_new_tokens, "temperature": temperature, "draft_len": k,
              "requested_draft_len": spec.draft_len, "draft_len_from_auto": own is not None and k == own,
              "adaptive": adaptive, "seed": seed, "chat_template": has_chat_template(tok),
              "tokens_per_s_definition": "decode tokens / decode seconds summed over prompts and turns; "
                                         "the prefill and the token it produces are excluded",
              "load_s": load_s}
    result.update(summarize(records))
    result["identical_outputs"]["checked"] = sp.greedy
    if hf is not None:
        result["hf_transformers"] = hf.summary()
    if llama is not None:
        result["llamacpp"] = llama.summary()
    elif "llamacpp" in compare:
        result["llamacpp"] = {"tokens_per_s": None, "skipped": "llama.cpp not found"}
    result["machine"] = machine_info()
    result["prompts"] = details
    return result
