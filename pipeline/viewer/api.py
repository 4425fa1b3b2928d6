"""The REST API: `POST /api/v1/predict`, `GET /api/v1/model` (HTTP Basic), `GET /api/v1/health` (open),
and for users with the reviewer role `GET /api/v1/review/next` and `POST /api/v1/feedback`.

Errors are JSON `{"error": "..."}` with a 4xx status (5xx only for a bug, still without a
traceback). The upload is read into memory with a byte cap (the multipart parser is told never to
spool to disk), analysed, and dropped: nothing is written, and neither the file name nor any DICOM
identifier is logged or returned.

Review routes answer 401 without a valid login and 403 (JSON) for a viewer-role user.
`GET /api/v1/review/next[?after=IMAGE_ID]` gives the next film this reviewer has not finished, in
the predict response's shape plus `image_id`, `split`, `position`, `reviewed`, `total` and the
reviewer's marks in force on it (`image_id` null once every film is reviewed).
`POST /api/v1/feedback` takes `{"marks": [{"image_id", "label", "call", "heatmap", "boxes"?}, ...],
"retract": ["<mark id>", ...]}` (either list may be left out), validates every item
(pipeline/feedback.py) and stores all of them or none: 201 with the new records' ids; 422 naming
the first invalid item; 400 for a body that is not a JSON object; 415 without a JSON content type;
413 past CXR_FEEDBACK_BODY_BYTES; 403 to retract another reviewer's mark.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging

from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.concurrency import run_in_threadpool

from pipeline.feedback import FeedbackError, NotYours
from pipeline.viewer.auth import REVIEWER, LoginThrottle, TooManyFailures, Users, log_in
from pipeline.viewer.card import NOTICE
from pipeline.viewer.inference import Analysis, ImageError, NoModel, ServedModels, anatomy_of_label
from pipeline.viewer.limits import Busy, InFlight, Limits
from pipeline.viewer.render import b64png, heatmap_gray
from pipeline.viewer.review import NoFilms, ReviewFilms
from pipeline.viewer.shortcut_warning import rule_summary, warns

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


async def read_json_body(request: Request, max_bytes: int):
    """The request's JSON body, refusing more than `max_bytes` before reading it all."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "send the marks as application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body exceeds the limit of {max_bytes} bytes")
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise ApiError(413, f"the request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None


def analysis_json(a: Analysis, models: ServedModels, heatmaps: bool = True) -> dict:
    """The predict response: labels sorted by probability, each with threshold, heatmap, anatomy share
    and lift, and whether the shortcut warning fires."""
    preds = []
    for k in a.order():
        label = a.labels[k]
        item = {"label": label, "probability": round(float(a.latest.probabilities[k]), 4),
                "threshold": round(a.thresholds[k], 4),
                "positive": bool(a.latest.probabilities[k] >= a.thresholds[k]),
                "anatomy": anatomy_of_label(label), "anatomy_share": a.latest.shares[k],
                "anatomy_fraction": a.fractions[k], "anatomy_lift": a.latest.lifts[k],
                "shortcut_warning": warns(a.latest.lifts[k])}
        if heatmaps:
            item["heatmap_png"] = b64png(heatmap_gray(a.latest.cams[k]))
        if a.baseline is not None:
            item["baseline"] = {"cycle": a.baseline.cycle,
                                "probability": round(float(a.baseline.probabilities[k]), 4),
                                "anatomy_share": a.baseline.shares[k], "anatomy_lift": a.baseline.lifts[k],
                                "shortcut_warning": warns(a.baseline.lifts[k])}
            if heatmaps:
                item["baseline"]["heatmap_png"] = b64png(heatmap_gray(a.baseline.cams[k]))
        preds.append(item)
    return {
        "model": model_summary(models),
        "image": a.source,
        "image_png": b64png(a.image),
        "anatomy_mask_png": None if a.mask is None else b64png(a.mask),
        "anatomy_mask_values": {"lungs": 1, "heart": 2, "both": 3},
        "shortcut_warning_rule": rule_summary(),
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


def marks_json(marks) -> list[dict]:
    """A reviewer's marks in force, as the review routes return them."""
    return [{"id": r["id"], "label": r["label"], "call": r["call"], "heatmap": r["heatmap"], "boxes": r["boxes"],
             "time": r["time"]} for r in marks.to_dict("records")]


def router(models: ServedModels, users: Users, max_bytes: int, card_fn, throttle: LoginThrottle | None = None,
           max_inflight: int = 4, films: ReviewFilms | None = None,
           max_feedback_bytes: int = Limits.feedback_body_bytes) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    throttle = throttle or LoginThrottle.from_env()
    inflight = InFlight(max_inflight)   # analyses holding an upload or a film in memory, waiting or running
    films = films or ReviewFilms(models)

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

    def require_reviewer(user: str = Depends(require_user)) -> str:
        if users.role(user) != REVIEWER:
            raise ApiError(403, "the review routes need the reviewer role")
        return user

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
        return {**model_summary(models), "shortcut_warning_rule": rule_summary(), "card": card_fn()}

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

    def next_film(user: str, after: str | None, heatmaps: bool) -> dict:
        try:
            image_id = films.next_unreviewed(user, after)
            reviewed, total = films.progress(user)
            if image_id is None:
                return {"image_id": None, "reviewed": reviewed, "total": total, "message": "every film is reviewed"}
            info = films.info(image_id)
            body = analysis_json(films.analyse(image_id), models, heatmaps)
        except NoFilms as err:
            raise ApiError(503, str(err)) from None
        return {"image_id": image_id, "split": info["split"], "position": info["position"], "reviewed": reviewed,
                "total": total, "marks": marks_json(films.marks(user, image_id)), **body}

    @r.get("/review/next")
    async def review_next(after: str | None = None, heatmaps: bool = True,
                          user: str = Depends(require_reviewer)) -> JSONResponse:
        await run_in_threadpool(loaded)
        try:
            with inflight.slot():
                body = await run_in_threadpool(next_film, user, after, heatmaps)
        except Busy as err:
            raise ApiError(429, str(err), {"Retry-After": str(err.retry_after)}) from None
        return JSONResponse(body)

    @r.post("/feedback")
    async def post_feedback(request: Request, user: str = Depends(require_reviewer)) -> JSONResponse:
        body = await read_json_body(request, max_feedback_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object {"marks": [...], "retract": [...]}')
        extra = set(body) - {"marks", "retract"}
        if extra:
            raise ApiError(422, f"unknown field(s) {', '.join(sorted(extra))[:200]}: send marks and retract")
        await run_in_threadpool(loaded)
        try:
            records = await run_in_threadpool(films.save, user, body.get("marks", []), body.get("retract", []))
        except NotYours as err:
            raise ApiError(403, str(err)) from None
        except FeedbackError as err:
            raise ApiError(422, str(err)) from None
        except NoFilms as err:
            raise ApiError(503, str(err)) from None
        log.info("feedback: %d record(s) saved", len(records))
        return JSONResponse({"ids": [x["id"] for x in records if x["type"] == "mark"],
                             "retractions": [x["id"] for x in records if x["type"] == "retraction"]},
                            status_code=201)

    return r


