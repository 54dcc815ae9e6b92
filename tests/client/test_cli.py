"""The `ckpt` CLI through `main([...])` against one real `ckpt serve` for the module."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.client.cli import main
from service.client.client import sha256_file
from tests.api.test_real_server import start_server, stop_server
from tests.factories import TinyConvNet

HEAVY = ("torch", "fastapi", "starlette")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_server(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield url
    finally:
        stop_server(proc)


class Cli:
    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--url", self.url, "--retries", "1", *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(server: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


def test_push_show_pull_ls(cli: Cli, recipe_files: dict[str, Path], tmp_path: Path) -> None:
    path = recipe_files["original"]
    pushed = cli.json("push", str(path), "--name", "cli-orig", "--label", "stage=pretrained")
    digest = sha256_file(path)
    assert pushed["artifact"]["id"] == digest and "cli-orig" in pushed["artifact"]["names"]
    again = cli.json("push", str(path), "--name", "cli-orig")
    assert again["uploaded"] is False
    code, out, _ = cli("push", str(path))
    assert code == 0 and "already stored" in out and digest in out

    shown = cli.json("show", "cli-orig", "--manifest")
    assert shown["id"] == digest
    assert set(shown["manifest"]["entries"]) == set(torch.load(path, weights_only=True))
    code, out, _ = cli("show", "cli-orig", "--manifest")
    assert code == 0 and "features.1.running_mean" in out and digest in out

    code, out, _ = cli("pull", "cli-orig", "-o", str(tmp_path / "copy.pth"))
    assert code == 0 and "sha256 verified" in out
    assert (tmp_path / "copy.pth").read_bytes() == path.read_bytes()
    pulled = cli.json("pull", digest, "-o", str(tmp_path))
    assert Path(pulled["path"]).parent == tmp_path and pulled["id"] == digest

    listed = cli.json("ls", "--all")
    assert digest in [item["id"] for item in listed["items"]]
    code, out, _ = cli("ls", "--name", "cli-orig")
    header = ["ID", "NAMES", "FORMAT", "KEYS", "SIZE", "FROM", "CREATED"]
    assert code == 0 and out.splitlines()[0].split() == header
    assert digest[:12] in out


def test_merge_writes_the_verified_final_file(cli: Cli, recipe_files: dict[str, Path],
                                              tmp_path: Path) -> None:
    final = tmp_path / "final.pth"
    code, out, err = cli("merge", str(recipe_files["original"]), str(recipe_files["trained"]),
                         "-a", "tiny-convnet", "-o", str(final), "--name", "cli-final")
    assert code == 0, err
    assert "verification: ok" in out and "filled from the original: 6 keys" in out
    TinyConvNet().load_state_dict(torch.load(final, weights_only=True), strict=True)
    data = cli.json("merge", "cli-final", str(recipe_files["trained"]), "-a", "tiny-convnet")
    assert data["report"]["verification"]["ok"] is True


def test_merge_verification_failure_exits_1_with_the_keys(cli: Cli, recipe_files: dict[str, Path]) -> None:
    code, out, err = cli("merge", str(recipe_files["original"]), str(recipe_files["trained"]), "-a", "mlp-bn")
    assert code == 1
    assert "missing keys (18):" in err and "  blocks.0.1.running_mean" in err
    assert "unexpected keys (" in err and "  features.0.weight" in err
    code, out, err = cli("merge", str(recipe_files["original"]), str(recipe_files["trained"]), "-a", "mlp-bn",
                         "--json")
    assert code == 1
    problem = json.loads(out)["error"]
    assert problem["status"] == 422 and "blocks.0.1.running_mean" in problem["missing_keys"]


def test_diff(cli: Cli, recipe_files: dict[str, Path]) -> None:
    cli.json("push", str(recipe_files["original"]), "--name", "diff-a")
    cli.json("push", str(recipe_files["trained"]), "--name", "diff-b")
    data = cli.json("diff", "diff-a", "diff-b", "-n", "--frozen")
    assert data["summary"]["only_in_a"] == 6 and data["summary"]["changed"] == 2
    assert sorted(data["frozen"]["changed"]) == ["head.bias", "head.weight"]
    code, out, _ = cli("diff", "diff-a", "diff-b", "-n", "--frozen", "features.")
    assert code == 0 and "only_in_a (6):" in out and "frozen check (" in out and "ok, unchanged" in out


def test_strip_names_and_rm(cli: Cli, recipe_files: dict[str, Path]) -> None:
    cli.json("push", str(recipe_files["trained"]), "--name", "strip-src")
    stripped = cli.json("strip", "strip-src", "--name", "strip-out")
    entries = cli.json("show", "strip-out", "--manifest")["manifest"]["entries"]
    assert entries and not any(k.startswith("module.") for k in entries)
    named = cli.json("name", "set", "strip-alias", "strip-out")
    assert named == {"name": "strip-alias", "id": stripped["id"]}
    names = {n["name"]: n["id"] for n in cli.json("name", "ls")}
    assert names["strip-alias"] == stripped["id"]
    code, out, _ = cli("name", "rm", "strip-alias")
    assert code == 0 and "strip-alias" in out
    code, _, err = cli("rm", stripped["id"])
    assert code == 1 and "409" in err  # a name still points to it
    removed = cli.json("rm", stripped["id"], "--force")
    assert removed == {"id": stripped["id"], "names_removed": ["strip-out"]}


def test_container_key_options(cli: Cli, recipe_files: dict[str, Path], tmp_path: Path) -> None:
    # A training file: the pretrained weights under "state_dict", the fine-tune under "ema.model" (one level down,
    # where the default rule does not look), an argparse.Namespace next to them.
    live = torch.load(recipe_files["original"], weights_only=True)
    tuned = torch.load(recipe_files["trained"], weights_only=True)
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": live, "ema": {"model": tuned}, "args": argparse.Namespace(lr=0.1)}, path)

    raw = cli.json("push", str(path))["artifact"]  # stored with the default key: the container keys must win
    pushed = cli.json("push", str(path), "--container-key", "ema.model", "--name", "ck-ema")
    code, out, _ = cli("push", str(path), "--container-key", "ema.model")
    stripped = cli.json("strip", sha256_file(path), "--container-key", "ema.model")
    diffed = cli.json("diff", sha256_file(path), "ck-ema", "--a-container-key", "ema.model")
    both = cli.json("diff", sha256_file(path), sha256_file(path), "--container-key", "ema.model")
    merged = cli.json("merge", str(recipe_files["original"]), str(path), "-a", "tiny-convnet",
                      "--container-key", "ema.model")

    art = pushed["artifact"]
    assert raw["container_key"] == "state_dict" and raw["id"] == sha256_file(path)
    assert art["lineage"]["operation"] == "extract" and art["key_count"] == len(tuned)
    assert code == 0 and f"('ema.model' of {sha256_file(path)[:12]})" in out
    assert stripped["report"]["applied"] == {"module.": len(tuned)}
    assert diffed["summary"]["unchanged"] == len(tuned) and diffed["summary"]["changed"] == 0
    assert both["summary"]["unchanged"] == len(tuned)
    assert merged["report"]["verification"]["ok"] is True
    # The same result as merging the extracted fine-tune, not the pretrained weights the default rule finds.
    assert cli.json("merge", str(recipe_files["original"]), "ck-ema", "-a", "tiny-convnet")["id"] == merged["id"]
    assert cli.json("merge", str(recipe_files["original"]), str(path), "-a", "tiny-convnet")["id"] != merged["id"]
    code, _, err = cli("strip", sha256_file(path), "--container-key", "ema.nope")
    assert code == 1 and "ema.nope" in err


def test_arch_commands(cli: Cli, recipe_files: dict[str, Path], tmp_path: Path) -> None:
    listed = cli.json("arch", "ls")
    assert {"tiny-convnet", "mlp-bn"} <= {a["name"] for a in listed["items"]}
    code, out, _ = cli("arch", "show", "tiny-convnet")
    assert code == 0 and "features.1.running_var" in out
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"w": {"shape": [2, 2], "dtype": "float32"}}))
    code, out, err = cli("arch", "register", "cli-spec", "--keys-file", str(keys), "--description", "d")
    assert code == 0, err
    assert cli.json("arch", "show", "cli-spec")["key_count"] == 1
    code, _, _ = cli("arch", "rm", "cli-spec")
    assert code == 0
    code, _, err = cli("arch", "show", "cli-spec")
    assert code == 1 and "404" in err


def test_merge_protections(cli: Cli, recipe_files: dict[str, Path], tmp_path: Path) -> None:
    original, trained = str(recipe_files["original"]), str(recipe_files["trained"])
    code, _, err = cli("merge", trained, original, "-a", "tiny-convnet")  # the wrong way round
    assert code == 1
    assert "look swapped" in err and "BatchNorm stats only the trained has (6):" in err
    assert "  features.1.running_mean" in err
    code, out, err = cli("merge", trained, original, "-a", "tiny-convnet", "--allow-swapped")
    assert code == 0, err
    assert "warning: original and trained look swapped (allowed by allow_swapped)" in out

    sd = torch.load(recipe_files["trained"], weights_only=True)
    head = tmp_path / "model-00002-of-00002.pth"
    torch.save({k: v for k, v in sd.items() if "head." in k}, head)
    code, out, err = cli("merge", original, str(head), "-a", "tiny-convnet")
    assert code == 0, err
    assert "of which parameters: 6 of 8 (in features)" in out and "looks like shard 2 of 2" in out
    code, _, err = cli("merge", original, str(head), "-a", "tiny-convnet", "--require-complete")
    assert code == 1 and "keys the trained checkpoint lacks (6):" in err and "  features.0.weight" in err


def test_prefix_alignment_commands(cli: Cli, recipe_files: dict[str, Path], tmp_path: Path) -> None:
    model = TinyConvNet()
    holder = torch.nn.Module()
    holder.net = model
    held = tmp_path / "held.pth"
    torch.save(holder.state_dict(), held)
    cli.json("push", str(held), "--name", "align-held")
    cli.json("push", str(recipe_files["trained"]), "--name", "align-trained")

    code, out, err = cli("arch", "ls", "--matches", "align-held")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["NAME", "SCORE"] and lines[2].split()[:2] == ["tiny-convnet", "1.000"]
    assert "strip 'net.'" in lines[2]
    ranked = cli.json("arch", "ls", "--matches", "align-trained")["matches"]["ranking"]
    assert ranked[0]["name"] == "tiny-convnet" and ranked[0]["transform"]["strip_wrappers"] is True

    code, out, err = cli("diff", "align-trained", "align-held", "--align-prefixes")
    assert code == 0, err
    assert "aligned: a strip wrappers, b strip 'net.' (8 keys in common)" in out
    code, out, err = cli("strip", "align-trained", "--like", "align-held", "--name", "align-out")
    assert code == 0, err
    assert "renamed: strip wrappers, add 'net.'; 8 of 14 target keys line up" in out
    entries = cli.json("show", "align-out", "--manifest")["manifest"]["entries"]
    assert all(k.startswith("net.") for k in entries)
    stripped = cli.json("strip", "align-held", "--like-architecture", "tiny-convnet")
    assert stripped["report"]["matched"] == 14
    assert cli("strip", "align-held", "--like", "x", "--prefix", "net.")[0] == 2  # one or the other


def test_usage_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    assert cli()[0] == 2  # no command
    code, _, err = cli("push", str(tmp_path / "missing.pth"))
    assert code == 2 and "no such file" in err
    assert cli("merge", "a", "b")[0] == 2  # no --arch
    present = tmp_path / "x.pth"
    present.write_bytes(b"x")
    code, _, err = cli("push", str(present), "--label", "novalue")
    assert code == 2 and "key=value" in err
    code, out, _ = cli("--help")
    assert code == 0 and "exit codes:" in out and "CKPT_URL" in out


def test_failures_exit_1(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli("show", "0" * 64, "--json")
    assert code == 1 and "404" in err
    assert json.loads(out)["error"]["type"] == "urn:ckpt:problem:artifact-not-found"
    assert main(["--url", "http://127.0.0.1:9", "--retries", "1", "ls"]) == 1
    assert "ConnectError" in capsys.readouterr().err


def test_env_url(server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CKPT_URL", server)
    assert main(["name", "ls", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert main(["--json", "name", "ls"]) == 0  # global options go before or after the command
    assert isinstance(json.loads(capsys.readouterr().out), list)
    monkeypatch.setenv("CKPT_URL", "http://127.0.0.1:9")
    assert main(["--url", server, "name", "ls"]) == 0  # the flag wins


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def test_cli_help_imports_no_torch_nor_httpx() -> None:
    probe = ("import sys\nfrom service.client.cli import main\nassert main(['--help']) == 0\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'fastapi', 'starlette', 'httpx', 'pydantic', 'tqdm'}))")
    done = _fresh_python(probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_client_library_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import service.client.cli, service.client.client"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "httpx" in imported  # the probe did import the client
    assert not imported & set(HEAVY)
