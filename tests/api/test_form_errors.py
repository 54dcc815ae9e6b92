"""Multipart mistakes answer with the field the file belongs in (curl -F trained=@file instead of trained_file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize("role", ["original", "trained"])
def test_a_file_in_a_ref_field_names_the_file_field(
    client: TestClient, recipe_files: dict[str, Path], role: str
) -> None:
    other = "trained" if role == "original" else "original"
    before = client.get("/checkpoints").json()["total"]
    with recipe_files[role].open("rb") as fh, recipe_files[other].open("rb") as fh2:
        r = client.post("/merge", data={"architecture": "tiny-convnet"},
                        files={role: (f"{role}.pth", fh), f"{other}_file": (f"{other}.pth", fh2)})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert f"multipart field '{role}' takes a ref (an artifact id or a name)" in detail
    assert f"a file goes in '{role}_file' (curl: -F {role}_file=@PATH)" in detail
    assert "UTF-8" not in detail
    assert client.get("/checkpoints").json()["total"] == before


def test_binary_without_a_filename_in_a_ref_field_names_the_file_field(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    body = recipe_files["trained"].read_bytes()
    boundary = "b0undary"
    payload = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"architecture\"\r\n\r\ntiny-convnet\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"trained\"\r\n\r\n"
    ).encode() + body + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/merge", content=payload, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400
    assert "a file goes in 'trained_file'" in r.json()["detail"]


def test_a_file_in_a_text_field_says_it_takes_text(client: TestClient, recipe_files: dict[str, Path]) -> None:
    with recipe_files["original"].open("rb") as fh:
        r = client.post("/checkpoints", files={"file": ("o.pth", fh), "name": ("name.txt", b"x")})
    assert r.status_code == 400
    assert r.json()["detail"] == "multipart field 'name' takes text, not a file (curl: -F name=VALUE, without '@')"
