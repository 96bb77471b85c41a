"""Benchmark prompt files: JSONL, one object per line.

Each object has either ``prompt`` (a string) or ``turns`` (a list of strings run
in sequence as one conversation), an optional ``category`` and an optional id
(``id`` or ``question_id``). Blank lines are skipped. Any other problem is an
error naming the file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEFAULT_CATEGORY = "uncategorized"


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    turns: tuple[str, ...]
    category: str = DEFAULT_CATEGORY
    line: int = 0  # 1-based line in the file it came from (0: built in code)

    @property
    def multi_turn(self) -> bool:
        return len(self.turns) > 1


def default_prompts_path() -> Path:
    """The project's own prompt set, shipped as package data."""
    return Path(str(resources.files("mtpdraft.bench") / "prompts.jsonl"))


def _is_text(x) -> bool:
    return isinstance(x, str) and x.strip() != ""


def parse_prompt_line(text: str, lineno: int, source: str = "<prompts>") -> Prompt | None:
    """Parse one line; None for a blank line. Raises PromptFileError naming the line."""
    if not text.strip():
        return None

    def fail(msg: str) -> PromptFileError:
        return PromptFileError(f"{source}: line {lineno}: {msg}")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_turns = "prompt" in obj, "turns" in obj
    if has_prompt and has_turns:
        raise fail("give either 'prompt' or 'turns', not both")
    if has_prompt:
        if not _is_text(obj["prompt"]):
            raise fail("'prompt' must be a non-empty string")
        turns = (obj["prompt"],)
    elif has_turns:
        t = obj["turns"]
        if not isinstance(t, list) or not t:
            raise fail("'turns' must be a non-empty list of strings")
        for i, s in enumerate(t):
            if not _is_text(s):
                raise fail(f"'turns'[{i}] must be a non-empty string")
        turns = tuple(t)
    else:
        raise fail("missing 'prompt' (a string) or 'turns' (a list of strings)")
    category = obj.get("category", DEFAULT_CATEGORY)
    if not _is_text(category):
        raise fail("'category' must be a non-empty string")
    pid = obj.get("id", obj.get("question_id"))
    if "id" in obj and "question_id" in obj and obj["id"] != obj["question_id"]:
        raise fail("'id' and 'question_id' disagree")
    if pid is None:
        pid = f"line{lineno}"
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or (isinstance(pid, str) and not pid.strip()):
        raise fail("the id ('id' or 'question_id') must be a non-empty string or an integer")
    return Prompt(id=str(pid), turns=turns, category=category.strip(), line=lineno)


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file (default: the shipped set); the first `limit` prompts."""
    path = Path(path) if path is not None else default_prompts_path()
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason})") from None
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        p = parse_prompt_line(line, lineno, str(path))
        if p is None:
            continue
        if p.id in seen:
            raise PromptFileError(f"{path}: line {lineno}: duplicate id {p.id!r} (first on line {seen[p.id]})")
        seen[p.id] = lineno
        prompts.append(p)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (the file is empty)")
    return prompts[:limit] if limit else prompts
