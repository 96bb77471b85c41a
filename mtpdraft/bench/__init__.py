"""Benchmark harness: `mtpdraft bench` and its pieces.

- `run_bench(...)` runs plain and speculative decoding on a prompt set and returns the result dict;
- `load_prompts(path)` reads a JSONL prompt file (default: the shipped `prompts.jsonl`);
- the statistics functions (`speedup`, `merge_acceptance`, `per_category`, `summarize`, ...) are pure.
"""

from __future__ import annotations

from .prompts import Prompt, PromptFileError, default_prompts_path, load_prompts, parse_prompt_line
from .report import markdown_report, write_plot, write_report
from .runner import machine_info, run_bench, run_conversation
from .stats import (PromptRecord, RunStats, acceptance_rates, combine, identical_outputs, merge_acceptance,
                    mode_summary, per_category, speedup, summarize, tokens_per_s)

__all__ = ["Prompt", "PromptFileError", "default_prompts_path", "load_prompts", "parse_prompt_line",
           "markdown_report", "write_plot", "write_report", "machine_info", "run_bench", "run_conversation",
           "PromptRecord", "RunStats", "acceptance_rates", "combine", "identical_outputs", "merge_acceptance",
           "mode_summary", "per_category", "speedup", "summarize", "tokens_per_s"]
