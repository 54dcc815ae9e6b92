"""The /ui/ pages as HTTP resources: public shells with a strict CSP, escaped, under a path prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.ui import STATIC

PAGES = ["/", "/ui/", "/ui/checkpoints/abc", "/ui/diff?a=x&b=y", "/ui/architectures"]


@pytest.fixture
def secured(tmp_path: Path) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", api_tokens="read:r1,write:w1", sandbox=False)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("page", PAGES)
def test_pages_need_no_token_and_send_a_strict_csp(secured: TestClient, page: str) -> None:
    r = secured.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    # No inline script or handler: every <script> has a src on this origin.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text)
    assert not re.search(r"\son[a-z]+=", r.text)
    assert "http://" not in r.text.replace('xmlns="http://www.w3.org', "") and "https://" not in r.text


def test_static_files_are_public(secured: TestClient) -> None:
    for path in sorted(STATIC.iterdir()):
        r = secured.get(f"/ui/static/{path.name}")
        assert r.status_code == 200, path.name
        assert r.headers["x-content-type-options"] == "nosniff"


def test_the_static_scripts_never_write_html() -> None:
    for path in sorted(STATIC.glob("*.js")):
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{path.name} uses {sink}"


def test_the_ref_in_a_page_is_escaped(client: TestClient) -> None:
    r = client.get("/ui/checkpoints/%3Cimg%20src=x%20onerror=alert(1)%3E")
    assert r.status_code == 200
    assert "<img" not in r.text
    assert 'data-ref="&lt;img src=x onerror=alert(1)&gt;"' in r.text


def test_links_follow_the_root_path(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path / "data")), root_path="/ckpt") as client:
        r = client.get("/ui/diff")
        assert 'data-root="/ckpt"' in r.text
        hrefs = re.findall(r'(?:href|src|action)="([^"]*)"', r.text)
        assert hrefs and all(h.startswith("/ckpt/") for h in hrefs if h != "data:,"), hrefs
        redirect = client.get("/ui", follow_redirects=False)
        assert redirect.status_code == 308 and redirect.headers["location"] == "/ckpt/ui/"


def test_the_pages_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]
