"""The REST API: `POST /api/v1/predict`, `GET /api/v1/model` (HTTP Basic), `GET /api/v1/health` (open).

Errors are JSON `{"error": "..."}` with a 4xx status (5xx only for a bug, still without a
traceback). The upload is read into memory with a byte cap (the multipart parser is told never to
spool to disk), analysed, and dropped: nothing is written, and neither the file name nor any DICOM
identifier is logged or returned.
"""
from __future__ import annotations

import base64
import binascii
import logging

from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.concurrency import run_in_threadpool

from pipeline.viewer.auth import LoginThrottle, TooManyFailures, Users, log_in
from pipeline.viewer.card import NOTICE
from pipeline.viewer.inference import SHORTCUT_SHARE, Analysis, ImageError, NoModel, ServedModels, anatomy_of_label
from pipeline.viewer.limits import Busy, InFlight
from pipeline.viewer.render import b64png, heatmap_gray

log = logging.getLogger(__name__)
REALM = 'Basic realm="cxr-viewer", charset="UTF-8"'


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"invalid request: {where} {first.get('msg', '')}".strip())


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """(name, password) of an HTTP Basic header, else None (absent or malformed)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        name, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (name, password) if sep else None


class _InMemoryParser(MultiPartParser):
    """Starlette's parser, but a file part stays in memory (our byte cap bounds it)."""
    spool_max_size = 1 << 62


async def read_upload(request: Request, max_bytes: int, field: str = "file") -> bytes:
    """The bytes of multipart field `field`, refusing more than `max_bytes` before reading them all."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the image as multipart/form-data in the field '{field}'")
    slack = 64 * 1024  # multipart framing around the file
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + slack:
        raise ApiError(413, f"the upload exceeds the limit of {max_bytes // (1024 * 1024)} MB")

    async def capped() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes + slack:
                raise ApiError(413, f"the upload exceeds the limit of {max_bytes // (1024 * 1024)} MB")
            yield chunk

    try:
        form = await _InMemoryParser(request.headers, capped(), max_files=1, max_fields=8).parse()
    except MultiPartException as err:
        raise ApiError(400, f"malformed multipart body: {err}") from None
    try:
        part = form.get(field)
        if not isinstance(part, UploadFile):
            raise ApiError(400, f"no file in the multipart field '{field}'")
        data = await part.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise ApiError(413, f"the upload exceeds the limit of {max_bytes // (1024 * 1024)} MB")
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    return data


def analysis_json(a: Analysis, models: ServedModels, heatmaps: bool = True) -> dict:
    """The predict response: labels sorted by probability, each with threshold, heatmap and anatomy share."""
    preds = []
    for k in a.order():
        label = a.labels[k]
        share = a.latest.shares[k]
        item = {"label": label, "probability": round(float(a.latest.probabilities[k]), 4),
                "threshold": round(a.thresholds[k], 4),
                "positive": bool(a.latest.probabilities[k] >= a.thresholds[k]),
                "anatomy": anatomy_of_label(label), "anatomy_share": share,
                "shortcut_warning": None if share is None else bool(share < SHORTCUT_SHARE)}
        if heatmaps:
            item["heatmap_png"] = b64png(heatmap_gray(a.latest.cams[k]))
        if a.baseline is not None:
            item["baseline"] = {"cycle": a.baseline.cycle,
                                "probability": round(float(a.baseline.probabilities[k]), 4),
                                "anatomy_share": a.baseline.shares[k]}
            if heatmaps:
                item["baseline"]["heatmap_png"] = b64png(heatmap_gray(a.baseline.cams[k]))
        preds.append(item)
    return {
        "model": model_summary(models),
        "image": a.source,
        "image_png": b64png(a.image),
        "anatomy_mask_png": None if a.mask is None else b64png(a.mask),
        "anatomy_mask_values": {"lungs": 1, "heart": 2, "both": 3},
        "shortcut_warning_below": SHORTCUT_SHARE,
        "predictions": preds,
        "timings_ms": a.timings_ms,
        "notice": NOTICE,
    }


def model_summary(models: ServedModels) -> dict:
    served = models.latest
    return {"cycle": served.cycle, "arch": served.meta.get("arch"), "labels": served.meta.get("labels"),
            "image_size": served.meta.get("image_size"), "source": served.meta.get("source"),
            "data_hash": served.meta.get("data_hash"), "checkpoint_sha256": served.sha256,
            "cam_method": models.cam_method,
            "baseline_cycle": models.baseline.cycle if models.baseline is not None else None}


def router(models: ServedModels, users: Users, max_bytes: int, card_fn, throttle: LoginThrottle | None = None,
           max_inflight: int = 4) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    throttle = throttle or LoginThrottle.from_env()
    inflight = InFlight(max_inflight)   # predicts holding an upload in memory, reading, waiting or analysing

    def require_user(request: Request) -> str:
        if "authorization" not in request.headers:
            raise ApiError(401, "authentication required (HTTP Basic)", {"WWW-Authenticate": REALM})
        name, password = basic_credentials(request) or (None, None)
        try:   # a sync dependency: FastAPI runs it in the thread pool, off the event loop
            ok = log_in(users, throttle, request.client.host if request.client else None, name, password)
        except TooManyFailures as err:
            raise ApiError(429, str(err), {"Retry-After": str(err.retry_after)}) from None
        if not ok:
            raise ApiError(401, "authentication required (HTTP Basic)", {"WWW-Authenticate": REALM})
        return name

    def loaded() -> None:
        try:
            models.load()
        except NoModel as err:
            raise ApiError(503, str(err)) from None

    @r.get("/health")
    def health() -> dict:
        try:
            models.load()
        except NoModel as err:
            return {"status": "no_model", "model_loaded": False, "message": str(err)}
        return {"status": "ok", "model_loaded": True, "cycle": models.latest.cycle}

    @r.get("/model")
    def model(user: str = Depends(require_user)) -> dict:
        loaded()
        return {**model_summary(models), "card": card_fn()}

    @r.post("/predict")
    async def predict(request: Request, baseline: bool = True, heatmaps: bool = True,
                      user: str = Depends(require_user)) -> JSONResponse:
        await run_in_threadpool(loaded)
        try:
            with inflight.slot():
                data = await read_upload(request, max_bytes)
                try:
                    result = await run_in_threadpool(models.analyse, data, baseline)
                except ImageError as err:
                    raise ApiError(422, str(err)) from None
                finally:
                    del data
                body = await run_in_threadpool(analysis_json, result, models, heatmaps)
        except Busy as err:
            raise ApiError(429, str(err), {"Retry-After": str(err.retry_after)}) from None
        log.info("predict: %s image analysed in %.0f ms", result.source["format"], result.timings_ms["total"])
        return JSONResponse(body)

    return r


