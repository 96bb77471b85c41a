"""Reference decoders measured in the same bench run: Hugging Face transformers
(plain greedy and prompt-lookup decoding) and, when installed, llama.cpp.

Both replay the contexts of mtpdraft's plain run, turn by turn, interleaved with
mtpdraft's own runs. Timing: new tokens after the first / (generate wall time -
a separately measured prefill, i.e. the same call with max_new_tokens=1), which
matches mtpdraft's decode-only tokens/s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .stats import RunStats

TIMING_NOTE = ("decode only: (new tokens - 1) / (generate wall time - wall time of the same call with "
               "max_new_tokens=1), summed over prompts and turns; prefill excluded")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Acc:
    """Decode tokens / seconds accumulated from (wall time, prefill time, new tokens) measurements."""

    def __init__(self):
        self.run = RunStats()
        self.matched = 0
        self.total = 0

    def add(self, n_new: int, wall_s: float, prefill_s: float) -> None:
        self.run.decode_tokens += max(0, n_new - 1)
        self.run.decode_s += max(0.0, wall_s - prefill_s)
        self.run.tokens += n_new
        self.run.prefill_s += prefill_s
        self.run.generations += 1


class HFBaseline:
    def __init__(self, path, dtype: str, sp, draft_len: int, eos_ids, log=_say):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.dtype = dtype
        self.sp, self.k, self.eos = sp, draft_len, sorted(eos_ids)
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
        self.load_s = time.perf_counter() - t0
        self.plain, self.pld = _Acc(), _Acc()
        log(f"transformers baseline loaded from {path} in {self.load_s:.1f}s")

    def _generate(self, ids: list[int], n: int, lookup: bool) -> tuple[list[int], float]:
        torch = self.torch
        kw = dict(max_new_tokens=n, eos_token_id=self.eos, pad_token_id=self.eos[0] if self.eos else None)
        if self.sp.greedy:
            kw.update(do_sample=False, top_k=None, top_p=None, temperature=None)
        else:
            kw.update(do_sample=True, temperature=self.sp.temperature, top_k=0, top_p=1.0)
        if lookup:
            kw["prompt_lookup_num_tokens"] = self.k
        inp = torch.tensor([ids])
        if self.sp.seed is not None:
            torch.manual_seed(self.sp.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(inp, attention_mask=torch.ones_like(inp), **kw)
        wall = time.perf_counter() - t0
        return out[0, len(ids):].tolist(), wall

    def warmup(self, ids: list[int], n: int) -> None:
        self._generate(ids, n, False)
        self._generate(ids, n, True)

    def run(self, prompt, contexts: list[list[int]], reference: list[list[int]]) -> None:
        n = self.sp.max_new_tokens
        for ctx, ref in zip(contexts, reference):
            _, pre = self._generate(ctx, 1, False)
            out, wall = self._generate(ctx, n, False)
            self.plain.add(len(out), wall, pre)
            self.plain.matched += out == ref
            self.plain.total += 1
            out, wall = self._generate(ctx, n, True)
            self.pld.add(len(out), wall, pre)
            self.pld.matched += out == ref
            self.pld.total += 1

    def summary(self) -> dict:
        return {"tokens_per_s": self.plain.run.tokens_per_s, "prompt_lookup_tokens_per_s": self.pld.run.tokens_per_s,
                "prompt_lookup_num_tokens": self.k, "includes_prefill": False, "timing": TIMING_NOTE,
                "total_tokens": self.plain.run.decode_tokens, "total_s": self.plain.run.decode_s,
                "prompt_lookup_total_tokens": self.pld.run.decode_tokens, "prompt_lookup_total_s": self.pld.run.decode_s,
                "identical_to_mtpdraft_plain": {"matched": self.plain.matched, "total": self.plain.total},
                "prompt_lookup_identical_to_mtpdraft_plain": {"matched": self.pld.matched, "total": self.pld.total},
                "dtype": self.dtype, "load_s": self.load_s}


def find_gguf(model_arg: str, lm) -> tuple[Path | None, tempfile.TemporaryDirectory | None]:
    """The GGUF behind `--model`: the file itself, the bundled model's GGUF, or one in the model dir."""
    from ..registry import BUNDLED

    p = Path(model_arg).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p, None
    if model_arg in BUNDLED:
        tmp = tempfile.TemporaryDirectory(prefix="mtpdraft-gguf-")
        return BUNDLED[model_arg].fetch_gguf(Path(tmp.name)), tmp
    found = sorted(Path(lm.path).glob("*.gguf"))
    return (found[0], None) if found else (None, None)


class LlamaCppBaseline:
    """llama.cpp through the `llama_cpp` module (per prompt, plain and prompt lookup),
    else `llama-bench` (synthetic generation of max_new_tokens, once). Never installed here."""

    @classmethod
    def find(cls, model_arg: str, lm, sp, draft_len: int, log=_say):
        has_module = importlib.util.find_spec("llama_cpp") is not None
        bench_bin = shutil.which("llama-bench")
        others = [b for b in ("llama-cli", "llama-server") if shutil.which(b)]
        if not (has_module or bench_bin or others):
            _say("llama.cpp not found, skipped")
            return None
        if not (has_module or bench_bin):
            _say(f"llama.cpp: found {', '.join(others)} but this bench drives only the llama_cpp module or "
                 f"llama-bench; skipped")
            return None
        gguf, tmp = find_gguf(model_arg, lm)
        if gguf is None:
            _say(f"llama.cpp: no GGUF file for {model_arg}, skipped")
            return None
        return cls(gguf, tmp, sp, draft_len, "module" if has_module else bench_bin, log)

    def __init__(self, gguf: Path, tmp, sp, draft_len: int, how: str, log=_say):
        self.gguf, self._tmp, self.sp, self.k, self.how = gguf, tmp, sp, draft_len, how
        self.plain, self.pld = _Acc(), _Acc()
        self.bench_result: dict | None = None
        if how == "module":
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            common = dict(model_path=str(gguf), n_ctx=8192, n_threads=os.cpu_count(), verbose=False,
                          seed=sp.seed if sp.seed is not None else 0)
            self.llm = Llama(**common)
            self.llm_pld = Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=draft_len))
        log(f"llama.cpp baseline: {how} with {gguf}")

    def _generate(self, llm, ids: list[int], n: int) -> tuple[int, float]:
        llm.reset()
        eos = llm.token_eos()
        temp = self.sp.temperature
        count = 0
        t0 = time.perf_counter()
        for t in llm.generate(ids, temp=temp, top_k=1 if temp == 0 else 0, top_p=1.0, repeat_penalty=1.0, reset=True):
            count += 1
            if t == eos or count >= n:
                break
        return count, time.perf_counter() - t0

    def run(self, prompt, contexts: list[list[int]]) -> None:
        if self.how != "module":
            return
        for ctx in contexts:
            _, pre = self._generate(self.llm, ctx, 1)
            n, wall = self._generate(self.llm, ctx, self.sp.max_new_tokens)
            self.plain.add(n, wall, pre)
            n, wall = self._generate(self.llm_pld, ctx, self.sp.max_new_tokens)
            self.pld.add(n, wall, pre)

    def _run_bench_binary(self) -> dict:
        cmd = [self.how, "-m", str(self.gguf), "-p", "0", "-n", str(self.sp.max_new_tokens), "-r", "3",
               "-t", str(os.cpu_count()), "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            return {"tokens_per_s": None, "error": (out.stderr or out.stdout)[-500:], "command": " ".join(cmd)}
        m = re.search(r"\[.*\]", out.stdout, re.S)
        rows = [r for r in json.loads(m.group(0) if m else "[]") if r.get("n_gen", 0) > 0]
        tps = rows[0].get("avg_ts") if rows else None
        return {"tokens_per_s": tps, "command": " ".join(cmd),
                "timing": "llama-bench synthetic generation of max_new_tokens tokens (not the bench prompts)"}

    def summary(self) -> dict:
        if self.how != "module":
            d = self._run_bench_binary()
        else:
            d = {"tokens_per_s": self.plain.run.tokens_per_s, "prompt_lookup_tokens_per_s": self.pld.run.tokens_per_s,
                 "prompt_lookup_num_tokens": self.k, "total_tokens": self.plain.run.decode_tokens,
                 "total_s": self.plain.run.decode_s, "includes_prefill": False, "timing": TIMING_NOTE}
        d.update(via="llama_cpp module" if self.how == "module" else "llama-bench", gguf=str(self.gguf))
        return d
