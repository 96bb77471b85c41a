"""Markdown report and PNG plot of a bench result dict."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt: str = ".1f", none: str = "n/a") -> str:
    return none if x is None else format(x, fmt)


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _draft_len_note(r: dict) -> str:
    """Where the draft length came from, when auto.json set it."""
    asked = r.get("requested_draft_len")
    if not r.get("draft_len_from_auto") or asked == r.get("draft_len"):
        return ""
    return " (auto.json's, chosen with its variant)" if asked is None else f" ({asked} asked, capped to auto.json's)"


def markdown_report(r: dict) -> str:
    m = r.get("machine", {})
    ident = r["identical_outputs"]
    lines = [
        f"# mtpdraft bench: {r['model']} with drafter `{r['drafter']}`",
        "",
        f"- dtype {r['dtype']}, {r['num_prompts']} prompts, max {r['max_new_tokens']} new tokens, "
        f"temperature {r['temperature']}, draft length {r.get('draft_len')}{' (adaptive)' if r.get('adaptive') else ''}"
        + _draft_len_note(r),
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('torch_threads', '?')} torch threads), "
        f"torch {m.get('torch', '?')}, {m.get('date', '')}",
        f"- tokens/s: {r.get('tokens_per_s_definition', 'decode tokens / decode seconds')}",
        f"- identical greedy outputs: {ident['matched']}/{ident['total']}"
        + ("" if ident.get("checked", True) else " (sampling: identity not required)")
        + (f" - MISMATCHED: {', '.join(map(str, ident['mismatched_ids']))}" if ident.get("mismatched_ids") else ""),
        "",
        "## Speed by category",
        "",
        "| category | prompts | plain tok/s | speculative tok/s | speedup | mean accepted tokens | identical |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cat, c in r["per_category"].items():
        lines.append(f"| {cat} | {c['num_prompts']} | {_f(c.get('baseline_tokens_per_s'))} | "
                     f"{_f(c.get('speculative_tokens_per_s'))} | {_x(c['speedup'])} | "
                     f"{_f(c['mean_accepted_tokens'], '.2f')} | {c.get('identical', '?')}/{c.get('checked', '?')} |")
    b, s = r["baseline"], r["speculative"]
    lines.append(f"| **overall** | **{r['num_prompts']}** | **{_f(b['tokens_per_s'])}** | **{_f(s['tokens_per_s'])}** | "
                 f"**{_x(r['speedup'])}** | **{_f(s['mean_accepted_tokens'], '.2f')}** | "
                 f"**{ident['matched']}/{ident['total']}** |")
    acc = s.get("acceptance_by_position") or []
    lines += ["", "## Acceptance by draft position", ""]
    if acc:
        prop = s.get("proposed_by_position") or [None] * len(acc)
        lines += ["| position | proposed | acceptance |", "|---:|---:|---:|"]
        lines += [f"| {i} | {p if p is not None else '?'} | {a:.1%} |" for i, (p, a) in enumerate(zip(prop, acc), 1)]
    else:
        lines.append("No draft tokens were proposed.")
    rows = [("mtpdraft plain", b["tokens_per_s"]), (f"mtpdraft {r['drafter']}", s["tokens_per_s"])]
    hf, ll = r.get("hf_transformers"), r.get("llamacpp")
    if hf:
        rows += [("transformers generate()", hf.get("tokens_per_s")),
                 (f"transformers prompt lookup ({hf.get('prompt_lookup_num_tokens')})", hf.get("prompt_lookup_tokens_per_s"))]
    if ll:
        if ll.get("tokens_per_s") is None:
            rows.append((f"llama.cpp ({ll.get('skipped') or ll.get('error') or 'n/a'})", None))
        else:
            rows.append((f"llama.cpp ({ll.get('via')})", ll.get("tokens_per_s")))
            if ll.get("prompt_lookup_tokens_per_s") is not None:
                rows.append(("llama.cpp prompt lookup", ll["prompt_lookup_tokens_per_s"]))
    if hf or ll:
        base = b["tokens_per_s"]
        lines += ["", "## Comparison (decode tokens/s, same prompts, same process)", "",
                  "| decoder | tok/s | vs mtpdraft plain |", "|---|---:|---:|"]
        lines += [f"| {name} | {_f(t)} | {_x(t / base if t and base else None)} |" for name, t in rows]
        if hf:
            lines += ["", f"transformers timing: {hf.get('timing', '')}"]
    return "\n".join(lines) + "\n"


def write_report(r: dict, path: str | Path) -> None:
    Path(path).write_text(markdown_report(r), encoding="utf-8")


def write_plot(r: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(r["per_category"])
    speeds = [r["per_category"][c]["speedup"] or 0.0 for c in cats] + [r["speedup"] or 0.0]
    labels = cats + ["overall"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = ["#4c72b0"] * len(cats) + ["#dd8452"]
    bars = ax1.bar(range(len(labels)), speeds, color=colors)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_xticks(range(len(labels)))
    ax1.set_xticklabels(labels, rotation=30, ha="right")
    ax1.set_ylabel("speedup over plain decoding (x)")
    ax1.set_title("Decode speedup per category")
    ax1.set_ylim(0, max(speeds + [1.0]) * 1.18)
    for bar, v in zip(bars, speeds):
        ax1.annotate(f"{v:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                     fontsize=8, xytext=(0, 2), textcoords="offset points")
    acc = r["speculative"].get("acceptance_by_position") or []
    if acc:
        xs = list(range(1, len(acc) + 1))
        ax2.plot(xs, acc, marker="o", color="#4c72b0", label="overall")
        for x, a in zip(xs, acc):
            ax2.annotate(f"{a:.0%}", (x, a), ha="center", va="bottom", fontsize=8, xytext=(0, 4),
                         textcoords="offset points")
        ax2.set_xticks(xs)
    else:
        ax2.text(0.5, 0.5, "no draft tokens proposed", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance rate")
    ax2.set_title(f"Acceptance by position (mean accepted tokens "
                  f"{r['speculative'].get('mean_accepted_tokens', 0):.2f})")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"mtpdraft bench: {r['model']} ({r['dtype']}), drafter {r['drafter']}, {r['num_prompts']} prompts, "
                 f"overall {r['speedup'] or 0:.2f}x", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
