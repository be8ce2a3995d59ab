"""Serve a classifier over HTTP: a JSON API, a web page, and micro-batched model calls.

``headstart serve RUN`` runs FastAPI on uvicorn (``pip install 'headstart[serve]'``):

- ``POST /predict``: one or more images (multipart field ``files``) -> top-k labels (a
  multi-label model: ``labels``, those at or above their thresholds, and every label's
  probability);
- ``POST /gradcam``: one image (field ``file``) -> PNG of the Grad-CAM overlay (runs only);
- ``GET /labels``, ``GET /health``, ``GET /docs`` (FastAPI's OpenAPI page), ``GET /`` the page.

Images from concurrent requests are gathered into one model call (`MicroBatcher`). Bad input
(not an image, empty, truncated, a decompression bomb, a wrong field, a body over the limit)
is a 4xx JSON ``{"error": "<one line>"}``, never a crash. Uploads are decoded from a private
temporary folder, deleted as soon as the image is read. SIGTERM answers the requests in
flight, then ends normally.
"""

import asyncio
import importlib.resources
import importlib.util
import io
import logging
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np

from headstart import figures
from headstart.data import UnreadableImage, read_image
from headstart.deploy.predictor import Predictor, load_predictor
from headstart.errors import UsageError
from headstart.explain import gradcam

log = logging.getLogger(__name__)

SERVE_EXTRA = "pip install 'headstart[serve]'"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_TOP_K = 5
SHUTDOWN_GRACE_S = 30  # on SIGTERM, how long requests in flight may take to finish
OVERLAY_SIDE = 384  # longest side of the Grad-CAM overlay PNG, in pixels
_STOP = object()  # MicroBatcher.close() -> its worker: answer what is queued, then stop


class MicroBatcher:
    """Gathers the images of concurrent requests into one model call.

    A model call never waits for requests that are not there yet: when the model is free it
    takes every image queued at that moment and runs. It waits (at most ``max_wait_ms``) only
    for images already announced by `coming`, i.e. of requests received and being decoded
    right now, so a lone client never waits, and concurrent ones share calls. While the model
    is busy, images queue up and the next call takes them all (at most ``max_batch``): one
    image per call under light load, full batches under heavy load. The model runs in one
    worker thread, so the event loop keeps accepting requests meanwhile. ``calls`` and
    ``images`` count what it did.
    """

    def __init__(self, predictor: Predictor, max_batch: int = 32, max_wait_ms: float = 5.0):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.calls = self.images = self.largest_batch = 0
        self._queue: asyncio.Queue | None = None
        self._changed: asyncio.Event | None = None  # an image queued, or an announced one failed
        self._worker: asyncio.Task | None = None
        self._coming = 0  # images announced (being decoded), not queued yet
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="headstart-model")

    @contextmanager
    def coming(self, count: int):
        """Announce ``count`` images that this block decodes and then `submit`s: a model call
        starting meanwhile may wait for them (up to ``max_wait_ms``)."""
        self._coming += count
        try:
            yield
        finally:
            self._coming -= count
            if self._changed is not None:
                self._changed.set()

    def submit(self, images: list[np.ndarray]) -> asyncio.Future:
        """Queue ``images`` now; the future's result is their probability rows, in order."""
        if self._closing:
            raise RuntimeError("the server is shutting down")
        if self._worker is None:  # started in the server's own event loop
            self._queue, self._changed = asyncio.Queue(), asyncio.Event()
            self._worker = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self._queue.put_nowait((image, future))
        self._changed.set()
        return asyncio.gather(*futures)

    async def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities (len(images), C), computed together with other requests' images."""
        return np.stack(await self.submit(images))

    async def close(self) -> None:
        """Answer every image already queued, then stop the worker (server shutdown: uvicorn
        calls this after its in-flight requests have finished, so normally nothing is left)."""
        self._closing = True
        if self._worker is not None:
            self._queue.put_nowait(_STOP)
            self._changed.set()
            await self._worker
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            batch, stop = await self._gather(loop)
            if batch:
                await self._call(loop, batch)

    async def _call(self, loop, batch: list) -> None:
        images = np.stack([image for image, _ in batch]).astype("float32")
        try:
            rows = await loop.run_in_executor(self._executor, self.predictor, images)
        except Exception as error:  # the model failed: every waiting request hears of it
            log.exception("model call failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.calls += 1
        self.images += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for (_, future), row in zip(batch, rows, strict=True):
            if not future.done():  # its client may have gone
                future.set_result(row)

    async def _gather(self, loop) -> tuple[list, bool]:
        """The next call's images: all those queued now (waiting for the first), then, while
        images are announced and not full, those arriving within ``max_wait``; and whether
        close() asked to stop."""
        first = await self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        await asyncio.sleep(0)  # requests that became ready in this same loop turn join in
        deadline = loop.time() + self.max_wait
        while True:
            while len(batch) < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    return batch, True
                batch.append(item)
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch or not self._coming or remaining <= 0:
                return batch, False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def stats(self) -> dict:
        return {
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
            "model_calls": self.calls,
            "images": self.images,
            "largest_batch": self.largest_batch,
        }


def serve(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
) -> None:
    """Serve ``run`` (a run directory or an exported artifact) until Ctrl-C or SIGTERM.

    Binds to 127.0.0.1 by default: only this machine can connect unless ``host`` says otherwise.
    SIGTERM shuts down gracefully: no new connections, the requests in flight are answered
    (for at most ``SHUTDOWN_GRACE_S``), then this returns normally (the CLI exits 0).
    """
    _require_server()
    import uvicorn

    _check_options(max_batch, max_wait_ms, max_upload_mb)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port!r}")
    app = create_app(
        load_predictor(run),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
    )
    log.info("serving %s on http://%s:%d/ (API docs at /docs)", run, host, port)
    with _sigterm_ends_normally():
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )


@contextmanager
def _sigterm_ends_normally():
    """uvicorn finishes the requests in flight on SIGTERM, then raises SIGTERM again with the
    handler that was there before it: make that one a no-op, so that a graceful shutdown ends
    as a normal return (exit status 0) rather than death by signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _require_server() -> None:
    needed = ("fastapi", "uvicorn", "multipart")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)}: {SERVE_EXTRA}")


def _check_options(max_batch: int, max_wait_ms: float, max_upload_mb: float) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UsageError(f"--max-batch must be a positive integer, got {max_batch!r}")
    if not max_wait_ms >= 0:
        raise UsageError(f"--max-wait-ms must be 0 or more, got {max_wait_ms!r}")
    if not max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be positive, got {max_upload_mb!r}")


def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
):
    """The FastAPI application serving ``predictor`` (see the module doc for the routes)."""
    _require_server()
    _check_options(max_batch, max_wait_ms, max_upload_mb)
    from fastapi import FastAPI, File, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    batcher = MicroBatcher(predictor, max_batch, max_wait_ms)
    explainer = _explainer(predictor)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = FastAPI(
        title="headstart classifier",
        description=f"{len(predictor.class_names)} classes, run by {predictor.runtime}",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, max_bytes=int(max_upload_mb * 1e6))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc.errors())}, status_code=422)

    async def decode(upload: UploadFile) -> np.ndarray:
        data = await upload.read()
        return await run_in_threadpool(_decode, data, upload.filename, predictor.image_size)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return _page()

    @app.get("/health")
    async def health():
        """Liveness, what is served, and what the micro-batcher has done."""
        return {
            "status": "ok",
            "runtime": predictor.runtime,
            "classes": len(predictor.class_names),
            "image_size": list(predictor.image_size),
            "gradcam": explainer is not None,
            "batching": batcher.stats(),
        }

    @app.get("/labels")
    async def labels():
        """The class names, in the model's output order."""
        return {"labels": predictor.class_names}

    @app.post("/predict")
    async def predict(
        files: Annotated[list[UploadFile], File(description="one or more image files")],
        top_k: Annotated[int, Query(ge=1, description="labels per image")] = DEFAULT_TOP_K,
    ):
        """Top-k labels and probabilities for each uploaded image."""
        with batcher.coming(len(files)):  # a model call starting meanwhile may wait for them
            images = [await decode(upload) for upload in files]
            answer = batcher.submit(images)
        rows = np.stack(await answer)
        return {
            "predictions": [
                _answer(predictor, upload.filename, row, top_k)
                for upload, row in zip(files, rows, strict=True)
            ]
        }

    @app.post("/gradcam", response_class=Response)
    async def gradcam(file: Annotated[UploadFile, File(description="one image file")]):
        """PNG: the image with its Grad-CAM heatmap for the predicted class over it."""
        if explainer is None:
            raise HTTPException(404, "Grad-CAM needs a run's model.keras, not an exported model")
        data = await file.read()
        png = await run_in_threadpool(explainer, data, file.filename)
        return Response(png, media_type="image/png")

    return app


# ----------------------------------------------------------------------------- helpers


def _decode(data: bytes, filename: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """The upload as read_image reads files (same pixels as training), via a private temporary
    folder that is deleted before this returns; a 400 naming the upload when unreadable."""
    from starlette.exceptions import HTTPException

    with tempfile.TemporaryDirectory(prefix="headstart-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return read_image(str(path), size)
        except UnreadableImage as error:
            message = f"{filename or 'upload'}: not a usable image ({error})"
            raise HTTPException(400, message) from None


def _answer(predictor, filename, row: np.ndarray, top_k: int) -> dict:
    """One image's answer; a multi-label model's also has ``labels`` (those at or above their
    thresholds), and ``top`` then has every label."""
    if not predictor.multi_label:
        return {"file": filename, "top": _top(row, predictor.class_names, top_k)}
    top = _top(row, predictor.class_names, len(predictor.class_names))
    return {"file": filename, "labels": predictor.labels_of(row), "top": top}


def _top(row: np.ndarray, class_names: list[str], k: int) -> list[dict]:
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": class_names[i], "probability": float(row[i])} for i in order]


def _validation_message(errors) -> str:
    """FastAPI's validation errors as one line that says what to send."""
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "missing" and location and location[-1] in ("files", "file"):
            return (
                f"no image: send multipart/form-data with the image(s) in field "
                f"'{location[-1]}' (e.g. curl -F {location[-1]}=@photo.jpg)"
            )
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid request')}"


def _explainer(predictor: Predictor):
    """A function (bytes, filename) -> Grad-CAM overlay PNG, or None where the model cannot
    give one (an exported artifact, a multi-label model, or a model whose head Grad-CAM does
    not handle)."""
    if predictor.model is None or predictor.multi_label:
        return None

    probe = np.zeros((1, *predictor.image_size, 3), "float32")
    try:
        gradcam(predictor.model, probe)
    except (UsageError, ValueError, KeyError) as error:
        log.info("no Grad-CAM for this model: %s", error)
        return None

    def explain(data: bytes, filename: str | None) -> bytes:
        from PIL import Image

        model_input = _decode(data, filename, predictor.image_size)
        heatmap = gradcam(predictor.model, model_input[None].astype("float32")).heatmaps[0]
        shown = Image.fromarray(_decode(data, filename, None))
        shown.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
        buffer = io.BytesIO()
        Image.fromarray(figures.overlay(np.asarray(shown), heatmap)).save(buffer, format="PNG")
        return buffer.getvalue()

    return explain


def _page() -> str:
    return (
        importlib.resources.files("headstart.deploy").joinpath("serve_page.html").read_text("utf-8")
    )


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 JSON error, whether its
    Content-Length says so up front or it only turns out while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (
            f"request body over the {self.max_bytes / 1e6:g} MB limit "
            f"(headstart serve --max-upload-mb)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"error": self._message()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())  # answered by the app's handler
            return message

        await self.app(scope, limited_receive, send)
