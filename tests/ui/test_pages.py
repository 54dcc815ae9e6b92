"""The four pages in headless Chromium against a real `ckpt serve` with a merge done."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import torch
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.factories import make_original, make_trained, save_pth
from tests.hardening.servers import Server, start_server, stop_server

EVIL = "<img src=x onerror=alert(1)>"
WAIT = 60


@dataclass
class Store:
    server: Server
    original: str
    trained: str
    merged: str
    evil: str


def _upload(client: httpx.Client, path: Path, **fields: str) -> str:
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)}, data=fields)
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("ui-store")
    server = start_server(tmp / "data", log_path=tmp / "server.log")
    try:
        original = make_original()
        files = tmp / "files"
        files.mkdir()
        with server.client() as client:
            o = _upload(client, save_pth(original.state_dict(), files / "original.pth"), name="base",
                        labels='{"stage": "pretrained"}')
            t = _upload(client, save_pth(make_trained(original).state_dict(), files / "trained.pth"),
                        name="run1-trained", labels='{"stage": "trained"}')
            r = client.post("/merge", data={"original": o, "trained": t, "architecture": "tiny-convnet",
                                            "frozen_prefixes": "features.", "name": "run1"})
            assert r.status_code == 201, r.text
            evil_sd = {f"{EVIL}.weight": torch.ones(2), "features.<script>alert(2)</script>": torch.zeros(3)}
            evil_path = files / "evil.pth"
            save_pth(evil_sd, evil_path)
            with evil_path.open("rb") as fh:
                r = client.post("/checkpoints", files={"file": (f"{EVIL}.pth", fh)},
                                data={"labels": json.dumps({"note": EVIL, "x": "<script>alert(3)</script>"})})
            assert r.status_code == 201, r.text
            yield Store(server, o, t, str(client.get("/checkpoints/run1").json()["id"]), r.json()["id"])
    finally:
        stop_server(server)


def wait_for(browser: webdriver.Chrome, css: str, *, text: str | None = None) -> WebElement:
    def found(driver: webdriver.Chrome) -> WebElement | bool:
        for element in driver.find_elements(By.CSS_SELECTOR, css):
            if element.is_displayed() and (text is None or text in element.text):
                return element
        return False

    element: WebElement = WebDriverWait(browser, WAIT).until(found, f"no visible {css!r} with {text!r}")
    return element


def wait_loaded(browser: webdriver.Chrome) -> None:
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "status").text == "", "the page kept a status message"
    )


def assert_clean(browser: webdriver.Chrome) -> None:
    """No alert opened and nothing went to the console as an error (CSP violations, exceptions)."""
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def shot(browser: webdriver.Chrome, directory: Path, name: str) -> None:
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(800, int(height)), 4000))
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(directory / f"{name}.png"))
    browser.set_window_size(1280, 1400)


def test_checkpoints_page(browser: webdriver.Chrome, store: Store, screenshot_dir: Path) -> None:
    browser.get(f"{store.server.url}/")
    browser.find_element(By.LINK_TEXT, "Checkpoints").click()
    wait_loaded(browser)
    assert wait_for(browser, "#total").text == "4 checkpoints, newest first"
    rows = browser.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")
    assert len(rows) == 4
    merged_row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{store.merged}"]')
    assert "merge" in merged_row.text
    shot(browser, screenshot_dir, "checkpoints")
    assert_clean(browser)

    browser.find_element(By.ID, "f-operation").send_keys("merge")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    WebDriverWait(browser, WAIT).until(lambda d: "operation=merge" in d.current_url)
    assert wait_for(browser, "#total").text == "1 checkpoint, newest first"
    browser.find_element(By.LINK_TEXT, "run1").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith(f"/ui/checkpoints/{store.merged}"))
    assert wait_for(browser, "#artifact-id").text == store.merged


def test_checkpoint_page(browser: webdriver.Chrome, store: Store, screenshot_dir: Path, download_dir: Path) -> None:
    browser.get(f"{store.server.url}/ui/checkpoints/run1")
    assert wait_for(browser, "#artifact-id").text == store.merged
    wait_loaded(browser)
    lineage = {a.get_attribute("data-role"): a.get_attribute("href")
               for a in browser.find_elements(By.CSS_SELECTOR, "#lineage a[data-role]")}
    assert lineage == {"original": f"{store.server.url}/ui/checkpoints/{store.original}",
                       "trained": f"{store.server.url}/ui/checkpoints/{store.trained}"}
    report = browser.find_element(By.ID, "report").text
    assert "frozen part unchanged" in report and "'module.' from 8 keys" in report
    # The manifest tree opens by module, from the keyboard.
    summary = browser.find_element(By.CSS_SELECTOR, '#manifest details[data-module="features"] > summary')
    summary.send_keys(Keys.ENTER)
    assert wait_for(browser, '#manifest details[data-module="features.0"] > summary')
    shot(browser, screenshot_dir, "checkpoint")

    for existing in download_dir.iterdir():
        existing.unlink()
    browser.find_element(By.CSS_SELECTOR, 'button.download[data-format="pth"]').click()
    wait_for(browser, "#download-state", text="Download started")
    WebDriverWait(browser, WAIT).until(
        lambda d: [p for p in download_dir.iterdir() if p.suffix == ".pth"], "no file was downloaded"
    )
    downloaded = next(p for p in download_dir.iterdir() if p.suffix == ".pth")
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == store.merged
    assert_clean(browser)


def _table(browser: webdriver.Chrome) -> list[str]:
    return [r.get_attribute("data-module") or "" for r in browser.find_elements(By.CSS_SELECTOR, "#modules tbody tr")]


def test_diff_page(browser: webdriver.Chrome, store: Store, screenshot_dir: Path) -> None:
    # From the merged checkpoint's page: "diff original → this" carries the merge's frozen prefixes.
    browser.get(f"{store.server.url}/ui/checkpoints/{store.merged}")
    wait_for(browser, "a.diff-link", text="original").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("return document.body.dataset.painted") == "true")
    wait_loaded(browser)
    query = parse_qs(urlsplit(browser.current_url).query)
    assert query == {"a": [store.original], "b": [store.merged], "frozen": ["features."]}
    with store.server.client() as client:
        api = client.get("/diff", params={"a": store.original, "b": store.merged}).json()
    for name, count in api["summary"].items():
        assert browser.find_element(By.ID, f"count-{name}").text == f"{count:,}"
    assert browser.find_element(By.ID, "link-a").get_attribute("href").endswith(f"/ui/checkpoints/{store.original}")
    assert browser.find_element(By.ID, "link-b").get_attribute("href").endswith(f"/ui/checkpoints/{store.merged}")
    features = browser.find_element(By.CSS_SELECTOR, '#modules tr[data-module="features"]')
    assert "❄ frozen" in features.text and "changed" not in features.text
    head = browser.find_element(By.CSS_SELECTOR, '#modules tr[data-module="head"]')
    assert "frozen" not in head.text
    assert "frozen" in browser.find_element(By.CSS_SELECTOR, '#chart g.bar[data-module="features"]').text
    assert "Frozen part unchanged" in browser.find_element(By.ID, "frozen-report").text
    shot(browser, screenshot_dir, "diff")
    assert_clean(browser)

    # The chart's depth: automatic (features, head), then the level below, in the URL too.
    bars = lambda: {g.get_attribute("data-module") for g in browser.find_elements(By.CSS_SELECTOR, "#chart g.bar")}  # noqa: E731
    assert bars() == {"features", "head"}
    depth = browser.find_element(By.ID, "c-depth")
    depth.send_keys("2", Keys.TAB)
    WebDriverWait(browser, WAIT).until(lambda d: "depth=2" in d.current_url)
    assert bars() == {"features.0", "features.1", "features.3", "features.4"}
    assert all("frozen" in g.text for g in browser.find_elements(By.CSS_SELECTOR, "#chart g.bar"))

    # Sorting by relative change, largest first: the URL says so and the head (trained) comes first.
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="rel_change"] button').click()
    WebDriverWait(browser, WAIT).until(lambda d: "sort=rel_change%3Adesc" in d.current_url)
    assert _table(browser)[0] == "head"

    # Freezing the head instead: the URL changes, and the table marks the head as a frozen module that moved.
    frozen = browser.find_element(By.ID, "c-frozen")
    frozen.clear()
    frozen.send_keys("head", Keys.TAB)
    WebDriverWait(browser, WAIT).until(lambda d: "frozen=head" in d.current_url)
    wait_for(browser, '#modules tr.moved[data-module="head"]')
    assert "⚠ changed" in browser.find_element(By.CSS_SELECTOR, '#modules tr[data-module="head"]').text
    wait_for(browser, "#frozen-report", text="Frozen part changed")
    assert_clean(browser)


def test_normalize_prefixes_control(browser: webdriver.Chrome, store: Store, screenshot_dir: Path) -> None:
    browser.get(f"{store.server.url}/ui/diff?a={store.original}&b={store.trained}")
    wait_for(browser, "#table-more", text="No tensors")
    assert _table(browser) == []
    tree = browser.find_element(By.CSS_SELECTOR, "#tree-only_in_b > summary")
    tree.send_keys(Keys.ENTER)
    assert wait_for(browser, '#tree-only_in_b details[data-module="module"]')
    browser.find_element(By.ID, "c-normalize").click()
    WebDriverWait(browser, WAIT).until(lambda d: "normalize_prefixes=true" in d.current_url)
    wait_for(browser, '#modules tr[data-module="head"]')
    assert {"features", "head"} <= set(_table(browser))
    assert_clean(browser)


def test_architectures_page(browser: webdriver.Chrome, store: Store, screenshot_dir: Path) -> None:
    browser.get(f"{store.server.url}/ui/")
    browser.find_element(By.LINK_TEXT, "Architectures").click()
    row = wait_for(browser, 'tr[data-name="tiny-convnet"]')
    assert "builtin" in row.text or "built" in row.text
    summary = browser.find_element(By.CSS_SELECTOR, "#arch-tiny-convnet > summary")
    summary.send_keys(Keys.ENTER)
    assert wait_for(browser, '#arch-tiny-convnet details[data-module="features"]')
    shot(browser, screenshot_dir, "architectures")
    assert_clean(browser)


def test_untrusted_text_never_runs(browser: webdriver.Chrome, store: Store, screenshot_dir: Path) -> None:
    base = store.server.url
    browser.get(f"{base}/ui/")
    wait_for(browser, f'tr[data-id="{store.evil}"]')
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{store.evil}"]').text
    assert f"note={EVIL}" in row and "x=<script>alert(3)</script>" in row and f"{EVIL}.pth" in row
    assert_clean(browser)

    browser.get(f"{base}/ui/checkpoints/{store.evil}")
    wait_for(browser, "#labels", text=EVIL)
    browser.find_element(By.CSS_SELECTOR, "#manifest details[data-module] > summary").click()
    wait_for(browser, "#manifest code", text="weight")
    assert_clean(browser)

    browser.get(f"{base}/ui/diff?a={store.original}&b={store.evil}&frozen={EVIL}")
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("return document.body.dataset.painted") == "true")
    for details in browser.find_elements(By.CSS_SELECTOR, "#trees > details > summary"):
        details.click()
    for summary in browser.find_elements(By.CSS_SELECTOR, "#tree-only_in_b details > summary"):
        summary.click()
    wait_for(browser, "#tree-only_in_b", text=EVIL)
    shot(browser, screenshot_dir, "xss")
    # A page with a hostile ref in its path.
    browser.get(f"{base}/ui/checkpoints/{EVIL}")
    wait_for(browser, "#status", text="Error")
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.execute_script("return document.querySelectorAll('main script, [onerror]').length") == 0
    assert_clean_but_404(browser)


def assert_clean_but_404(browser: webdriver.Chrome) -> None:
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "404" not in e["message"]
              and "400" not in e["message"]]
    assert not errors, errors


def test_a_token_prompt_then_the_page(browser: webdriver.Chrome, tmp_path: Path, screenshot_dir: Path) -> None:
    server = start_server(tmp_path / "data", log_path=tmp_path / "server.log",
                          env={"CKPT_API_TOKENS": "read:reader-token,write:writer-token"})
    try:
        with server.client() as client:
            path = save_pth({"w": torch.ones(3)}, tmp_path / "w.pth")
            with path.open("rb") as fh:
                r = client.post("/checkpoints", files={"file": ("w.pth", fh)},
                                headers={"Authorization": "Bearer writer-token"})
            assert r.status_code == 201
        browser.get(f"{server.url}/ui/")
        prompt = wait_for(browser, "#auth")
        assert "needs a token" in prompt.text
        shot(browser, screenshot_dir, "token-prompt")
        browser.find_element(By.ID, "token-input").send_keys("wrong", Keys.ENTER)
        wait_for(browser, "#auth-error", text="refused")
        browser.find_element(By.ID, "token-input").send_keys("reader-token", Keys.ENTER)
        assert wait_for(browser, "#total").text == "1 checkpoint, newest first"
        assert not browser.find_element(By.ID, "auth").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('ckpt-token')") == "reader-token"
        # The next page of the same tab needs no prompt.
        browser.find_element(By.LINK_TEXT, "Architectures").click()
        wait_for(browser, 'tr[data-name="tiny-convnet"]')
        assert not browser.find_element(By.ID, "auth").is_displayed()
        browser.execute_script("sessionStorage.clear()")
        # The only console errors are the 401s of the first load and of the wrong token, logged on purpose.
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert all("401" in m for m in errors), errors
    finally:
        stop_server(server)


@pytest.mark.slow
def test_diff_page_paints_20k_keys_quickly(browser: webdriver.Chrome, tmp_path: Path, screenshot_dir: Path) -> None:
    """Measured in the browser (performance marks), reported, not asserted: timing is the machine's."""
    keys = 20_000
    g = torch.Generator().manual_seed(0)
    a = {f"blocks.{i // 40}.layer{(i // 4) % 10}.w{i % 4}": torch.randn(8, generator=g) for i in range(keys)}
    b = {k: (v + 0.01 * torch.randn(8, generator=g) if k.startswith("blocks.1") else v.clone()) for k, v in a.items()}
    server = start_server(tmp_path / "data", log_path=tmp_path / "server.log")
    try:
        with server.client() as client:
            ida = _upload(client, save_pth(a, tmp_path / "a.pth"))
            idb = _upload(client, save_pth(b, tmp_path / "b.pth"))
        start = time.monotonic()
        browser.get(f"{server.url}/ui/diff?a={ida}&b={idb}&frozen=blocks.0")
        WebDriverWait(browser, 120).until(lambda d: d.execute_script("return document.body.dataset.painted") == "true")
        total = time.monotonic() - start
        paint_ms = browser.execute_script(
            "return performance.getEntriesByName('diff:response-to-paint')[0].duration")
        rows = len(browser.find_elements(By.CSS_SELECTOR, "#modules tbody tr"))
        assert rows == 200  # the first 200 of the 5,501 modules; "Show all" renders the rest
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart g.bar")) == 60  # of the 500 at depth 2
        report = f"20k-key diff page: API response to paint {paint_ms:.0f} ms; page load to paint {total:.2f} s\n"
        (screenshot_dir / "diff-20k-timing.txt").write_text(report)
        print(report)
        shot(browser, screenshot_dir, "diff-20k")
        assert_clean(browser)
    finally:
        stop_server(server)


def test_pages_under_a_path_prefix(browser: webdriver.Chrome, tmp_path: Path, download_dir: Path) -> None:
    """CKPT_ROOT_PATH=/ckpt, as behind a proxy that forwards /ckpt/...: every link, script and API call keeps it."""
    server = start_server(tmp_path / "data", log_path=tmp_path / "server.log", env={"CKPT_ROOT_PATH": "/ckpt"})
    try:
        with server.client() as client:
            artifact = _upload(client, save_pth({"enc.w": torch.ones(3), "head.w": torch.zeros(2)}, tmp_path / "w.pth"),
                               name="prefixed")
        base = f"{server.url}/ckpt"
        browser.get(f"{base}/")
        browser.find_element(By.LINK_TEXT, "Checkpoints").click()
        wait_for(browser, "#total", text="1 checkpoint")
        assert browser.current_url == f"{base}/ui/"
        browser.find_element(By.LINK_TEXT, "prefixed").click()
        assert wait_for(browser, "#artifact-id").text == artifact
        assert browser.current_url == f"{base}/ui/checkpoints/{artifact}"
        for existing in download_dir.iterdir():
            existing.unlink()
        browser.find_element(By.CSS_SELECTOR, 'button.download[data-format="pth"]').click()
        WebDriverWait(browser, WAIT).until(
            lambda d: [p for p in download_dir.iterdir() if p.suffix == ".pth"], "no file was downloaded"
        )
        downloaded = next(p for p in download_dir.iterdir() if p.suffix == ".pth")
        assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == artifact
        browser.get(f"{base}/ui/diff?a=prefixed&b=prefixed")
        WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("return document.body.dataset.painted") == "true")
        assert browser.find_element(By.ID, "link-a").get_attribute("href") == f"{base}/ui/checkpoints/{artifact}"
        assert browser.find_element(By.ID, "count-unchanged").text == "2"
        assert_clean(browser)
    finally:
        stop_server(server)
