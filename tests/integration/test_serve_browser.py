"""`sscxr serve` end to end in headless Chromium: the real server (uvicorn, a free local port), the page,
a file chosen in its input: the probabilities shown are the API's, the heat map and the lung contour
are loaded images, a bad file shows the server's message, and the page asks nothing of other hosts."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _chromium() -> str:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    pytest.importorskip("playwright.sync_api")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium executable on PATH")
    return path


def _models(root: Path) -> tuple[Path, Path]:
    from tiny_models import classifier_run, segmenter_run

    return classifier_run(root / "clf", {"fit": "pad"}), segmenter_run(root / "seg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """The real server on a free port of 127.0.0.1, in a background thread; yields its base URL."""
    import uvicorn

    from sscxr.serve import ServeOptions, create_app, load_models

    _chromium()
    clf, seg = _models(tmp_path)
    app = create_app(load_models(clf, seg), ServeOptions(device="cpu"))
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_the_page_shows_the_apis_answer_for_a_dropped_file(server: str, tmp_path: Path) -> None:
    import httpx
    from playwright.sync_api import expect, sync_playwright

    xray = tmp_path / "chest.png"
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((48, 64)) * 255).astype(np.uint8)).save(xray)
    api = httpx.post(f"{server}/explain", files={"file": ("chest.png", xray.read_bytes())}, timeout=20).json()
    bad = tmp_path / "report.txt"
    bad.write_text("not an image")

    requests: list[str] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = chromium.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server + "/", timeout=15_000)
            # A locator wait, not `wait_for_function` on a string: Playwright evals such strings in the
            # page, which the page's own Content-Security-Policy (no 'unsafe-eval') rightly refuses.
            expect(page.locator("#model-info")).to_contain_text("healthy", timeout=15_000)

            page.set_input_files("#file", str(xray))
            page.wait_for_selector("body[data-state=done]", timeout=15_000)
            shown = page.locator("#probabilities li .value").all_inner_texts()
            assert shown == [f"{name}: {p:.3f}" for name, p in api["probabilities"].items()]
            assert page.inner_text("#predicted") == api["predicted"]
            for img in ("#heatmap", "#lungs"):
                assert page.eval_on_selector(img, "e => e.complete && e.naturalWidth > 0"), img
            assert page.eval_on_selector("#lungs", "e => [e.naturalWidth, e.naturalHeight]") == [64, 48]
            assert page.inner_text("#lung-fraction") == f"{api['lung_fraction']:.3f}"
            assert page.is_visible("#result") and not page.is_visible("#error")

            page.set_input_files("#file", str(bad))
            page.wait_for_selector("body[data-state=error]", timeout=15_000)
            assert page.inner_text("#error").startswith("report.txt: ")
            assert not page.is_visible("#result")
        finally:
            chromium.close()
    assert requests and all(u.startswith(server + "/") or u.startswith("data:") for u in requests), requests
