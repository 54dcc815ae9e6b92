"""The tested-docs conventions (described for writers in docs/index.md): find the fenced code blocks of a
Markdown file, read the marker comment in front of each, split `console` blocks into commands and the output
they show, and match shown output against real output with `...` placeholders.

A marker is an HTML comment on the last non-blank line before the opening fence:

    <!-- run -->                 run the block (console: each `$ ` command; python: the script; bash: the script)
    <!-- run: exit=N -->         as `run`, but every command of the block must exit with N
    <!-- file: NAME -->          write the block to NAME in the document's working directory (not run)
    <!-- excerpt: PATH -->       the block is a verbatim excerpt of PATH (a file of the repository)
    <!-- norun: REASON -->       skipped by design, with the reason (Docker, a GPU, the PyTorch index, ...)
    <!-- requires: DOC -->       (anywhere in a document) run DOC's blocks first, on the same server and directory

```text blocks are output or diagrams and need no marker; every other block needs one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>run|norun|file|excerpt)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
REQUIRES = re.compile(r"<!--\s*requires:\s*(?P<doc>\S+)\s*-->")
PLACEHOLDER = "..."
KINDS_NEEDING_ARG = ("norun", "file", "excerpt")


@dataclass(frozen=True)
class Block:
    """One fenced code block and its marker."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    kind: str | None  # run, norun, file, excerpt, or None (no marker)
    arg: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def expected_exit(self) -> int:
        match = re.fullmatch(r"exit=(\d+)", self.arg)
        return int(match.group(1)) if match else 0


@dataclass
class Command:
    """A `$ ` command of a console block (continuation lines joined) and the output shown under it."""

    line: str
    shown: list[str] = field(default_factory=list)


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order, each with the marker in front of it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        lang = opening.group("info").strip().split(" ")[0] if opening.group("info").strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            text = lines[j]
            body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
            j += 1
        kind, arg = _marker_before(lines, i)
        blocks.append(Block(path=path, line=i + 1, lang=lang, body="\n".join(body) + "\n", kind=kind, arg=arg))
        i = j + 1
    return blocks


def _marker_before(lines: list[str], i: int) -> tuple[str | None, str]:
    k = i - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    if k < 0:
        return None, ""
    match = MARKER.match(lines[k])
    if not match:
        return None, ""
    return match.group("kind"), (match.group("arg") or "").strip()


def requirements(path: Path) -> list[str]:
    """The documents named by `<!-- requires: DOC -->` markers in a file (paths relative to the repository)."""
    return REQUIRES.findall(path.read_text(encoding="utf-8"))


def parse_console(body: str) -> list[Command]:
    """Split a console block into commands (`$ ` lines, `\\` continuations joined) and their shown output."""
    commands: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        text = lines[i]
        if text.startswith("$ "):
            command = text[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command + "\n" + lines[i]
            commands.append(Command(command))
        elif commands:
            commands[-1].shown.append(text)
        elif text.strip():
            raise ValueError(f"console block: output before the first `$ ` command: {text!r}")
        i += 1
    for command in commands:
        while command.shown and not command.shown[-1].strip():
            command.shown.pop()
    return commands


def _line_pattern(expected: str) -> re.Pattern[str]:
    parts = expected.rstrip().split(PLACEHOLDER)
    return re.compile(".*".join(re.escape(p) for p in parts))


def output_matches(shown: list[str], actual: list[str]) -> bool:
    """Whether real output matches the shown output.

    A shown line that is `...` alone stands for any number of lines (none included); `...` inside a line stands
    for any text on that line; everything else must be equal (trailing spaces and trailing blank lines aside).
    """
    actual = [a.rstrip() for a in actual]
    while actual and not actual[-1]:
        actual.pop()
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[i, j]
        if i == len(shown):
            result = j == len(actual)
        elif shown[i].strip() == PLACEHOLDER:
            result = any(match(i + 1, k) for k in range(j, len(actual) + 1))
        else:
            result = j < len(actual) and bool(_line_pattern(shown[i]).fullmatch(actual[j])) and match(i + 1, j + 1)
        memo[i, j] = result
        return result

    return match(0, 0)
