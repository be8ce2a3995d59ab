"""headstart serve: the JSON API answers like the model, concurrent requests share model calls,
bad input is a 4xx JSON line (never a crash), and the page works in a real browser."""

from __future__ import annotations

import importlib.util
import io
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serve tests need pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="serve tests need httpx: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="serve tests need pip install -e '.[serve]'")

from headstart import predict  # noqa: E402
from headstart.cli import main  # noqa: E402
from headstart.deploy.predictor import load_predictor  # noqa: E402
from headstart.deploy.serve import create_app  # noqa: E402
from headstart.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end training runs of several seconds each

serve_module = sys.modules["headstart.deploy.serve"]
CHROMIUM = Path("/usr/bin/chromium")
MAX_WAIT_MS = 150  # long enough that a call surely waits for images being decoded
MAX_UPLOAD_MB = 2


class Server:
    """A real uvicorn server on a free loopback port, in a thread, for the module's tests."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_run):
    app = create_app(
        load_predictor(tiny_run),
        max_batch=32,
        max_wait_ms=MAX_WAIT_MS,
        max_upload_mb=MAX_UPLOAD_MB,
    )
    running = Server(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def images(tiny_folder) -> list[Path]:
    return sorted(tiny_folder.rglob("*_00[0-3].png"))


def _expected(run, path: Path) -> list[tuple[str, float]]:
    return list(predict(run, [str(path)], top_k=2)[0].top)


def _top(answer: dict) -> list[tuple[str, float]]:
    return [(item["label"], item["probability"]) for item in answer["top"]]


def test_labels_health_and_predict_answer_like_the_model(client, tiny_run, images):
    assert client.get("/labels").json() == {"labels": ["cat", "dog"]}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == 2 and health["gradcam"] is True
    assert health["runtime"].startswith("keras ") and health["image_size"] == [32, 32]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images[:2]]
    response = client.post("/predict", files=files, params={"top_k": 2})
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert [a["file"] for a in answers] == [p.name for p in images[:2]]
    for path, answer in zip(images[:2], answers, strict=True):
        expected, got = _expected(tiny_run, path), _top(answer)
        assert [label for label, _ in got] == [label for label, _ in expected]
        assert np.allclose([p for _, p in got], [p for _, p in expected], atol=1e-5)
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_are_micro_batched(server, tiny_run, images):
    before = server.app.state.batcher.stats()
    clients = 16

    def one(i):
        path = images[i % len(images)]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            files = {"files": (path.name, path.read_bytes(), "image/png")}
            return path, client.post("/predict", files=files, params={"top_k": 1})

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    after = server.app.state.batcher.stats()
    for path, response in results:
        assert response.status_code == 200
        assert _top(response.json()["predictions"][0])[0][0] == _expected(tiny_run, path)[0][0]
    assert after["images"] - before["images"] == clients
    calls = after["model_calls"] - before["model_calls"]
    assert calls <= clients // 2, f"{clients} concurrent requests took {calls} model calls"
    assert after["largest_batch"] >= 2


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _bad_requests(good: bytes) -> list[tuple[str, dict]]:
    jpeg = io.BytesIO()
    Image.new("RGB", (200, 160), (200, 30, 30)).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    big = b"\x00" * (MAX_UPLOAD_MB * 1_000_000 + 1)
    return [
        ("not an image", {"files": {"files": ("notes.jpg", b"this is not a JPEG\n")}}),
        ("zero bytes", {"files": {"files": ("empty.png", b"")}}),
        ("truncated JPEG", {"files": {"files": ("cut.jpg", truncated)}}),
        ("20000x20000 PNG", {"files": {"files": ("bomb.png", _png_claiming(20000, 20000))}}),
        ("wrong field name", {"files": {"image": ("photo.png", good)}}),
        ("body over the limit", {"files": {"files": ("huge.png", big)}}),
        ("JSON, not multipart", {"json": {"image": "photo.png"}}),
        ("top_k 0", {"files": {"files": ("photo.png", good)}, "params": {"top_k": 0}}),
    ]


def test_bad_requests_are_4xx_json_lines_and_the_server_stays_up(client, tiny_run, images):
    good = images[0].read_bytes()
    bad = _bad_requests(good)
    statuses = {}
    for i in range(100):
        name, request = bad[i % len(bad)]
        response = client.post("/predict", **request)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        message = response.json()["error"]
        assert message and "\n" not in message, (name, message)
        statuses[name] = (response.status_code, message)
    assert statuses["not an image"] == (400, "notes.jpg: not a usable image (not an image)")
    assert statuses["zero bytes"] == (400, "empty.png: not a usable image (empty file)")
    assert statuses["truncated JPEG"][1].startswith("cut.jpg: not a usable image (truncated")
    assert statuses["20000x20000 PNG"] == (
        400,
        "bomb.png: not a usable image (too large (decompression bomb))",
    )
    assert statuses["wrong field name"][0] == 422
    assert "field 'files'" in statuses["wrong field name"][1]
    assert statuses["body over the limit"][0] == 413
    assert "2 MB limit" in statuses["body over the limit"][1]

    response = client.post("/predict", files={"files": ("photo.png", good)})
    assert response.status_code == 200
    top = response.json()["predictions"][0]["top"][0]["label"]
    assert top == _expected(tiny_run, images[0])[0][0]


def test_gradcam_endpoint_returns_an_overlay_png(client, images):
    response = client.post("/gradcam", files={"file": ("p.png", images[0].read_bytes())})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.mode == "RGB" and overlay.size == Image.open(images[0]).size
    response = client.post("/gradcam", files={"file": ("x.jpg", b"not an image")})
    assert response.status_code == 400 and "x.jpg" in response.json()["error"]


def test_page_has_no_internet_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="file"' in html and 'id="top-label"' in html
    for outside in ('src="http', "src='http", 'href="http', "url(http", "@import", "//cdn"):
        assert outside not in html


def test_an_exported_model_is_served_without_gradcam(tiny_run, tmp_path):
    from headstart.deploy.export import export

    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("needs onnxruntime: pip install -e '.[export]'")
    folder = export(tiny_run, "onnx", out=tmp_path / "onnx").path
    running = Server(create_app(load_predictor(folder), max_wait_ms=0))
    with httpx.Client(base_url=running.url, timeout=60) as client:
        health = client.get("/health").json()
        assert health["runtime"].startswith("onnxruntime ") and health["gradcam"] is False
        png = io.BytesIO()
        Image.new("RGB", (40, 48), (220, 40, 40)).save(png, format="PNG")
        answer = client.post("/predict", files={"files": ("red.png", png.getvalue())})
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["top"][0]["label"] in ("cat", "dog")
        missing = client.post("/gradcam", files={"file": ("p.png", png.getvalue())})
        assert missing.status_code == 404 and "exported" in missing.json()["error"]
    running.stop()


def test_bad_options_and_missing_packages_are_one_line(tiny_run, monkeypatch, capsys):
    predictor = load_predictor(tiny_run)
    with pytest.raises(UsageError, match="--max-batch"):
        create_app(predictor, max_batch=0)
    with pytest.raises(UsageError, match="--max-wait-ms"):
        create_app(predictor, max_wait_ms=-1)
    assert main(["serve", str(tiny_run), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        serve_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvicorn" else real(name, *a),
    )
    assert main(["serve", str(tiny_run)]) == 2
    assert capsys.readouterr().err.strip() == (
        "headstart: error: serve needs uvicorn: pip install 'headstart[serve]'"
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser check needs Debian's chromium: apt-get install chromium",
)
def test_the_page_classifies_an_image_in_headless_chromium(server, tiny_run, images, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="browser test needs playwright: pip install -e '.[test]'"
    )
    expected = _expected(tiny_run, images[0])[0][0]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('info').textContent.includes('px')")
            page.set_input_files("#file", str(images[0]))
            page.wait_for_function(
                "['cat', 'dog'].includes(document.getElementById('top-label').textContent)"
            )
            assert page.text_content("#top-label") == expected
            assert page.locator("#bars .bar").count() == 2
            page.wait_for_selector("#gradcam-card:not([hidden])")
            page.wait_for_function(  # the overlay PNG arrived and decoded
                "document.getElementById('gradcam').complete && "
                "document.getElementById('gradcam').naturalWidth > 0"
            )
            page.screenshot(path=str(tmp_path / "served_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "served_page.png").stat().st_size > 5_000
