"""The tested-docs machinery itself: markers, console blocks, and output matching with placeholders."""

from __future__ import annotations

from pathlib import Path

from tests.docs.blocks import output_matches, parse_blocks, parse_console, requirements


def test_markers_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- requires: README.md -->\n"
        "<!-- run -->\n```console\n$ echo hi\nhi\n```\n\n"
        "* a list item:\n\n  <!-- norun: docker -->\n  ```bash\n  docker compose up\n  ```\n"
        "```text\na diagram\n```\n"
        "<!-- run: exit=1 -->\n\n```console\n$ false\n```\n"
        "<!-- file: a.toml -->\n~~~toml\nx = 1\n~~~\n"
        "```python\nprint()\n```\n",
        encoding="utf-8",
    )
    blocks = parse_blocks(page)
    assert [(b.kind, b.arg, b.lang) for b in blocks] == [
        ("run", "", "console"), ("norun", "docker", "bash"), (None, "", "text"), ("run", "exit=1", "console"),
        ("file", "a.toml", "toml"), (None, "", "python")]
    assert blocks[1].body == "docker compose up\n"
    assert blocks[3].expected_exit == 1 and blocks[0].expected_exit == 0
    assert requirements(page) == ["README.md"]


def test_console_commands_continuations_and_output() -> None:
    commands = parse_console("$ a \\\n   --flag\nout 1\nout 2\n\n$ b\n$ c\nlast\n\n")
    assert [(c.line, c.shown) for c in commands] == [
        ("a \\\n   --flag", ["out 1", "out 2"]), ("b", []), ("c", ["last"])]


def test_placeholders() -> None:
    assert output_matches(["uploaded ...  12 keys"], ["uploaded 3b28d9833a69e49e…  12 keys  "])
    assert not output_matches(["uploaded ...  12 keys"], ["uploaded 3b28  13 keys"])
    assert output_matches(["{", "...", "}"], ["{", '  "a": 1,', '  "b": 2', "}", ""])
    assert output_matches(["{", "...", "}"], ["{", "}"])
    assert not output_matches(["a", "b"], ["a", "b", "c"])
    assert not output_matches(["a", "...", "c"], ["a", "b"])
