"""The FastAPI application behind ``slidesam serve``: a JSON API and one static page.

API (every error is JSON ``{"error": "one line"}`` with a 4xx/5xx status, never a traceback):

==========================================  ==================================================
``GET  /api/info``                          model, limits, whether a data folder is set
``GET  /api/files``                         images under ``--data-dir`` (relative paths)
``POST /api/sessions``                      upload an image (multipart field ``file``)
``POST /api/sessions/open``                 ``{"path": "rel/path.nii.gz"}`` from ``--data-dir``
``POST /api/sessions/ssa``                  ``{"plain": ..., "arterial": ...}`` from the folder
``POST /api/sessions/ssa-upload``           multipart fields ``plain`` and ``arterial``
``GET  /api/sessions/{id}``                 state: shape, prompts, labels per slice, job, review
``DELETE /api/sessions/{id}``               close it
``GET  /api/sessions/{id}/image/{s}``       slice ``s``: float32 little-endian, (H, W) row-major
``GET  /api/sessions/{id}/mask/{s}``        slice ``s`` of the label map: uint8 (H, W)
``POST /api/sessions/{id}/prompts``         box/points on a slice -> background Slide-SAM job
``GET  /api/sessions/{id}/job``             the job's state and progress (the page polls it)
``POST /api/sessions/{id}/edit``            brush / eraser / restore stroke (hand-edit layer)
``POST /api/sessions/{id}/undo``, ``redo``  one action back / forward (layers, prompts, review)
``POST /api/sessions/{id}/review``          mark an SSA slice as accepted (undoable)
``GET  /api/sessions/{id}/export``          the label map as NIfTI (the image's geometry)
``POST /api/sessions/{id}/save``            write ``<image>_mask.nii.gz`` into ``--data-dir``
==========================================  ==================================================

Long work (Slide-SAM propagation, SSA) runs in one worker thread (the CPU is the limit, not
the number of threads); a session runs one job at a time and refuses changes while it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from slidesam.core import InputError, Volume
from slidesam.core.prompts import Prompt
from slidesam.data.io import read_image, strip_suffix, write_mask
from slidesam.inference.predictor import SlideSAMPredictor
from slidesam.inference.propagation import PropagationConfig
from slidesam.ssa.boxes import axial_axis
from slidesam.web.annotate import run_segment, run_ssa_session
from slidesam.web.files import (
    PathOutsideDataDir,
    check_upload,
    list_images,
    mask_path_for,
    resolve_in_data_dir,
    safe_name,
)
from slidesam.web.state import (
    MAX_LABEL,
    Job,
    PinnedPredictor,
    ServerConfig,
    Session,
    SessionBusy,
    SessionLimit,
    SessionStore,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: slack for multipart framing on top of the file size limit
_FORM_OVERHEAD = 64 * 1024
_HEAD = 64 * 1024


class PromptIn(BaseModel):
    slice: int
    label: int = Field(1, ge=1, le=MAX_LABEL)
    box: list[float] | None = None
    points: list[list[float]] = Field(default_factory=list, max_length=256)
    point_labels: list[int] = Field(default_factory=list, max_length=256)
    propagate: bool = True


class EditIn(BaseModel):
    slice: int
    label: int = Field(1, ge=1, le=MAX_LABEL)
    mode: Literal["brush", "erase", "restore"] = "brush"
    radius: float = 3.0
    points: list[list[float]] = Field(min_length=1, max_length=10_000)


class OpenIn(BaseModel):
    path: str = Field(min_length=1, max_length=1000)


class SsaOpenIn(BaseModel):
    plain: str = Field(min_length=1, max_length=1000)
    arterial: str = Field(min_length=1, max_length=1000)


class ReviewIn(BaseModel):
    slice: int
    accepted: bool = True


def create_app(
    config: ServerConfig | None = None,
    *,
    model=None,
    checkpoint: str | None = None,
    stage1=None,
    propagation: PropagationConfig | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The web app.

    Args:
        config: limits and the data folder (``ServerConfig``).
        model: a loaded Slide-SAM ``Sam``; None loads ``checkpoint`` (None: the embedded model).
        stage1: SSA stage 1 (``predict(volume) -> label Volume``); None: the embedded U-Net,
            loaded on the first SSA run.
        propagation: settings of Slide-SAM propagation (``PropagationConfig``).
        allowed_hosts: accepted ``Host`` headers (DNS-rebinding guard for a localhost server);
            None accepts any.
    """
    config = config or ServerConfig()
    if model is None:
        from slidesam.inference.models import load_any

        model = load_any(checkpoint)
    model.merge_lora()  # once, shared by every session's predictor
    model_name = checkpoint or "embedded default Slide-SAM (phantoms only)"
    store = SessionStore(config)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidesam-job")
    prop = propagation or PropagationConfig()
    stage1_holder: dict[str, object] = {} if stage1 is None else {"stage1": stage1}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="slidesam", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.executor = executor
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    # --- errors: JSON, one line -----------------------------------------------------------
    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, exc: InputError):
        status = 400
        if isinstance(exc, PathOutsideDataDir):
            status = 403
        elif isinstance(exc, SessionBusy):
            status = 409
        elif isinstance(exc, SessionLimit):
            status = 503
        return _error(status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:3]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", ""))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        log.exception("internal error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
            "frame-ancestors 'none'"
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- helpers ---------------------------------------------------------------------------
    def _session(session_id: str) -> Session:
        try:
            return store.get(session_id)
        except KeyError:
            raise HTTPException(
                404, f"no session {session_id[:12]!r} (closed or expired)"
            ) from None

    def _data_dir() -> Path:
        if config.data_dir is None:
            raise HTTPException(400, "no data folder: start the server with --data-dir DIR")
        return config.data_dir

    def _new_session(volume: Volume, name: str, source: Path | None) -> Session:
        predictor = SlideSAMPredictor(model, merge_lora=False, cache_size=config.cache_size)
        return store.add(
            volume,
            name=name,
            axis=axial_axis(volume.geometry),
            predictor=PinnedPredictor(predictor),
            source=source,
        )

    def _start(session: Session, kind: str, work) -> dict:
        with session.lock:
            session.check_idle()
            job = Job(kind=kind, state="running", message="queued", started=time.monotonic())
            session.job = job

        def run() -> None:
            try:
                work()
                job.state, job.progress, job.message = "done", 1.0, "done"
            except InputError as exc:
                job.state, job.error, job.message = "error", str(exc), "failed"
            except Exception as exc:
                log.exception("job %s of session %s failed", kind, session.id[:6])
                job.state, job.message = "error", "failed"
                job.error = f"internal error ({type(exc).__name__}); see the server log"
            finally:
                job.seconds = time.monotonic() - job.started

        executor.submit(run)
        return job.to_dict()

    async def _receive(request: Request, fields: tuple[str, ...], tmp: Path) -> dict[str, Path]:
        limit = int(config.max_upload_mb * 2**20)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "uploads need a Content-Length header")
        if int(length) > limit * len(fields) + _FORM_OVERHEAD:
            raise HTTPException(413, f"upload too large: at most {config.max_upload_mb:g} MB")
        form = await request.form(max_files=len(fields), max_fields=len(fields) + 4)
        out = {}
        try:
            for name in fields:
                up = form.get(name)
                if not isinstance(up, UploadFile):
                    raise HTTPException(400, f"missing file field {name!r} in the upload")
                head = await up.read(_HEAD)
                suffix = check_upload(up.filename or "", head)
                filename = safe_name(up.filename or f"{name}{suffix}")
                target = tmp / name / filename
                target.parent.mkdir(parents=True)
                size = len(head)
                with target.open("wb") as f:
                    f.write(head)
                    while chunk := await up.read(2**20):
                        size += len(chunk)
                        if size > limit:
                            raise HTTPException(
                                413, f"upload too large: at most {config.max_upload_mb:g} MB"
                            )
                        f.write(chunk)
                out[name] = target
        finally:
            await form.close()
        return out

    def _read(path: Path, what: str) -> Volume:
        try:
            return read_image(path)
        except InputError as exc:
            # the message names a temporary path: say which upload instead
            raise InputError(f"{what}: {str(exc).split(': ', 1)[-1]}") from None

    # --- pages -----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- API -------------------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        return {
            "model": model_name,
            "data_dir": config.data_dir is not None,
            "max_upload_mb": config.max_upload_mb,
            "max_sessions": config.max_sessions,
            "sessions": len(store),
            "memory_mb": round(store.memory_mb(), 1),
            "max_memory_mb": config.max_memory_mb,
        }

    @app.get("/api/files")
    def files():
        return {"files": list_images(_data_dir())}

    @app.post("/api/sessions")
    async def upload(request: Request):
        tmp = Path(tempfile.mkdtemp(prefix="slidesam-upload-"))
        try:
            paths = await _receive(request, ("file",), tmp)
            path = paths["file"]
            volume = await run_in_threadpool(_read, path, path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        session = _new_session(volume, path.name, None)
        return session.to_dict()

    @app.post("/api/sessions/open")
    def open_file(body: OpenIn):
        path = resolve_in_data_dir(_data_dir(), body.path)
        volume = read_image(path)
        return _new_session(volume, path.name, path).to_dict()

    def _start_ssa(plain: Volume, arterial: Volume, name: str, source: Path | None) -> dict:
        session = _new_session(plain, name, source)

        def work() -> None:
            if "stage1" not in stage1_holder:
                from slidesam.stage1.unet import default_unet

                stage1_holder["stage1"] = default_unet()
            run_ssa_session(session, arterial, stage1_holder["stage1"])

        _start(session, "ssa", work)
        return session.to_dict()

    @app.post("/api/sessions/ssa")
    def open_ssa(body: SsaOpenIn):
        root = _data_dir()
        plain = resolve_in_data_dir(root, body.plain)
        arterial = resolve_in_data_dir(root, body.arterial)
        return _start_ssa(read_image(plain), read_image(arterial), plain.name, plain)

    @app.post("/api/sessions/ssa-upload")
    async def upload_ssa(request: Request):
        tmp = Path(tempfile.mkdtemp(prefix="slidesam-upload-"))
        try:
            paths = await _receive(request, ("plain", "arterial"), tmp)
            plain = await run_in_threadpool(_read, paths["plain"], paths["plain"].name)
            arterial = await run_in_threadpool(_read, paths["arterial"], paths["arterial"].name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _start_ssa(plain, arterial, paths["plain"].name, None)

    @app.get("/api/sessions/{session_id}")
    def state(session_id: str):
        session = _session(session_id)
        with session.lock:
            return session.to_dict()

    @app.delete("/api/sessions/{session_id}")
    def close(session_id: str):
        _session(session_id)
        store.close(session_id)
        return {"closed": session_id}

    @app.get("/api/sessions/{session_id}/image/{s}")
    def image_slice(session_id: str, s: int):
        session = _session(session_id)
        data = session.image_slice(s).astype("<f4")
        return Response(
            data.tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": f"{data.shape[0]},{data.shape[1]}"},
        )

    @app.get("/api/sessions/{session_id}/mask/{s}")
    def mask_slice(session_id: str, s: int):
        session = _session(session_id)
        with session.lock:
            data = session.mask_slice(s)
            version = session.version
        return Response(
            data.tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": f"{data.shape[0]},{data.shape[1]}", "X-Version": str(version)},
        )

    @app.post("/api/sessions/{session_id}/prompts")
    def add_prompt(session_id: str, body: PromptIn):
        session = _session(session_id)
        if len(body.points) != len(body.point_labels):
            raise InputError(f"{len(body.points)} points but {len(body.point_labels)} labels")
        prompt = Prompt(
            slice=body.slice,
            label=body.label,
            box=None if body.box is None else tuple(body.box),
            points=tuple(tuple(p) for p in body.points),
            point_labels=tuple(body.point_labels),
        )
        prompt.check_fits(session.n_slices, session.slice_shape)
        return _start(
            session,
            "segment",
            lambda: run_segment(session, prompt, propagate=body.propagate, config=prop),
        )

    @app.get("/api/sessions/{session_id}/job")
    def job(session_id: str):
        session = _session(session_id)
        return {**session.job.to_dict(), "version": session.version}

    @app.post("/api/sessions/{session_id}/edit")
    def edit(session_id: str, body: EditIn):
        session = _session(session_id)
        with session.lock:
            session.check_idle()
            session.paint(
                body.slice, body.points, label=body.label, radius=body.radius, mode=body.mode
            )
            return session.to_dict()

    @app.post("/api/sessions/{session_id}/undo")
    def undo(session_id: str):
        session = _session(session_id)
        with session.lock:
            session.check_idle()
            session.undo()
            return session.to_dict()

    @app.post("/api/sessions/{session_id}/redo")
    def redo(session_id: str):
        session = _session(session_id)
        with session.lock:
            session.check_idle()
            session.redo()
            return session.to_dict()

    @app.post("/api/sessions/{session_id}/review")
    def review(session_id: str, body: ReviewIn):
        session = _session(session_id)
        with session.lock:
            session.check_idle()
            s = session.check_slice(body.slice)
            marks = set(session.reviewed)
            (marks.add if body.accepted else marks.discard)(s)
            verb = "accepted" if body.accepted else "unmarked"
            session.apply(f"slice {s} {verb}", reviewed=frozenset(marks))
            return session.to_dict()

    def _mask_bytes(session: Session) -> bytes:
        with session.lock:
            labels = session.labels.copy()
        with tempfile.TemporaryDirectory(prefix="slidesam-export-") as tmp:
            path = write_mask(labels, session.volume, Path(tmp) / "mask.nii.gz")
            return path.read_bytes()

    @app.get("/api/sessions/{session_id}/export")
    def export(session_id: str):
        session = _session(session_id)
        name = strip_suffix(session.name) + "_mask.nii.gz"
        return Response(
            _mask_bytes(session),
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post("/api/sessions/{session_id}/save")
    def save(session_id: str):
        session = _session(session_id)
        root = _data_dir()
        if session.source is not None:
            target = mask_path_for(session.source)
        else:
            target = root / mask_path_for(Path(session.name)).name
        if not target.resolve().is_relative_to(root):
            raise PathOutsideDataDir("the mask would be written outside the data folder")
        tmp = target.with_name(".tmp-" + target.name)
        tmp.write_bytes(_mask_bytes(session))
        os.replace(tmp, target)
        return {
            "path": target.relative_to(root).as_posix(),
            "voxels": int(np.count_nonzero(session.labels)),
        }

    return app
