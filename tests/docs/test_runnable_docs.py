"""The documentation's code blocks run, in order, against a real `ckpt serve`, and show what they print.

Every fenced block of README.md and docs/**/*.md carries a marker (see tests/docs/blocks.py and docs/index.md):
`run` blocks are executed here with the repository's virtualenv first on PATH (so `ckpt` and `python` are the
installed ones), each page in a working directory of its own (a copy of the directories of the pages it
`requires`), against one real `ckpt serve` on a free port with a fresh data directory (the documented
`http://127.0.0.1:8000` is rewritten to it, and CKPT_URL points at it). Output shown under a `$ ` command is
checked, with `...` standing for ids, sizes and times. Pages share the server, so a page must not depend on
what another page stores unless it `requires` that page. Blocks that cannot run here are marked `norun: REASON`
and counted, never silently skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.blocks import Block, output_matches, parse_blocks, parse_console, requirements
from tests.hardening.servers import Server, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_URL = "http://127.0.0.1:8000"
RUNNABLE_LANGS = frozenset({"console", "python", "bash", "sh"})
COMMAND_TIMEOUT = 120
MARKERS = "<!-- run -->, <!-- norun: REASON -->, <!-- file: NAME -->, <!-- excerpt: PATH -->"

# Pages other branches add (linked from README.md and docs/index.md before they land).
PENDING_PAGES: frozenset[str] = frozenset()


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def runnable_documents() -> list[Path]:
    """The pages with blocks to run: the README first (other pages start where it ends), then docs/."""
    return [doc for doc in documents() if any(b.kind in ("run", "file") for b in parse_blocks(doc))]


def test_every_block_is_run_or_marked() -> None:
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for doc in documents():
        for block in parse_blocks(doc):
            if block.kind is None:
                if block.lang != "text":
                    problems.append(f"{_rel(doc)}:{block.line}: ```{block.lang} block without a marker ({MARKERS})")
                continue
            counts[block.kind] += 1
            if block.kind == "run" and block.lang not in RUNNABLE_LANGS:
                problems.append(f"{_rel(doc)}:{block.line}: cannot run a ```{block.lang} block")
            if block.kind != "run" and not block.arg:
                problems.append(f"{_rel(doc)}:{block.line}: `{block.kind}` needs an argument")
            if block.kind == "excerpt":
                source = ROOT / block.arg
                if not source.is_file() or block.body not in source.read_text(encoding="utf-8"):
                    problems.append(f"{_rel(doc)}:{block.line}: not a verbatim excerpt of {block.arg}")
    print(f"documentation code blocks: {dict(sorted(counts.items()))}")
    assert not problems, "\n".join(problems)
    assert counts["run"] >= 10 and counts["norun"] >= 1


def test_readme_keeps_the_two_commands() -> None:
    """CI (.ci/run) runs the README's test command; both commands must stay in the README, literally."""
    readme = ROOT / "README.md"
    code = "".join(b.body for b in parse_blocks(readme))
    assert "scripts/serve.sh" in code and "scripts/test.sh" in code
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


LINK = re.compile(r"\]\((?!https?://|mailto:)(?P<target>[^)#\s]*)(?:#(?P<anchor>[^)\s]*))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (outside code blocks)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-"))
    return found


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for doc in documents():
        for match in LINK.finditer(doc.read_text(encoding="utf-8")):
            target = (doc.parent / match.group("target")).resolve() if match.group("target") else doc
            if not target.exists():
                if _rel(target) not in PENDING_PAGES:
                    broken.append(f"{_rel(doc)}: {match.group(0)}")
            elif match.group("anchor") and target.suffix == ".md" and match.group("anchor") not in anchors(target):
                broken.append(f"{_rel(doc)}: {match.group(0)} (no such heading)")
    assert not broken, "\n".join(broken)


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(CKPT_URL=url, PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def _run_block(block: Block, *, url: str, work: Path, scratch: Path, env: dict[str, str]) -> None:
    body = block.body.replace(DOCUMENTED_URL, url)
    if block.kind == "file":
        (work / block.arg).write_text(body, encoding="utf-8")
        return
    if block.kind != "run":
        return
    if block.lang == "console":
        commands = parse_console(body)
        assert commands, f"{block.where}: a console block with no `$ ` command"
        for command in commands:
            started = time.monotonic()
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command.line], cwd=work, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=COMMAND_TIMEOUT)
            where = f"{block.where}: $ {command.line}"
            print(f"{time.monotonic() - started:6.2f} s  {where.splitlines()[0]}\n{done.stdout}", end="")
            assert done.returncode == block.expected_exit, (
                f"{where}\nexited {done.returncode}, expected {block.expected_exit}:\n{done.stdout}")
            if command.shown:
                assert output_matches(command.shown, done.stdout.splitlines()), (
                    f"{where}\nshown:\n" + "\n".join(command.shown) + f"\nactual:\n{done.stdout}")
        return
    script = scratch / f"block-{block.path.stem}-{block.line}.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(body, encoding="utf-8")
    argv = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    done = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=COMMAND_TIMEOUT)
    assert done.returncode == block.expected_exit, f"{block.where}: exited {done.returncode}:\n{done.stdout}"


class Pages:
    """Runs pages against one server, each page once, after the pages it requires."""

    def __init__(self, server: Server, root: Path) -> None:
        self.server, self.root = server, root
        self.env = _env(server.url)
        self.done: dict[Path, Path] = {}  # page -> its working directory, once all its blocks ran

    def run(self, page: Path) -> Path:
        if page in self.done:
            return self.done[page]
        work = self.root / _rel(page).replace("/", "-")
        scratch = self.root / "scratch"
        scratch.mkdir(exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for required in requirements(page):
            shutil.copytree(self.run(ROOT / required), work, dirs_exist_ok=True)
        for block in parse_blocks(page):
            _run_block(block, url=self.server.url, work=work, scratch=scratch, env=self.env)
        self.done[page] = work
        return work


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    root = tmp_path_factory.mktemp("docs")
    started = time.monotonic()
    server = start_server(root / "data", log_path=root / "server.log")
    print(f"{time.monotonic() - started:6.2f} s  server started")
    try:
        yield Pages(server, root)
        assert not server.server_errors(), "\n\n".join(server.server_errors())
    finally:
        stop_server(server)


@pytest.mark.parametrize("page", runnable_documents(), ids=_rel)
def test_runnable_blocks(page: Path, pages: Pages) -> None:
    pages.run(page)
