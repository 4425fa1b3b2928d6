"""One FastAPI app: the REST API under /api/v1 and the Gradio Blocks UI at /, both behind login.

    python -m pipeline.viewer            # or `make viewer`; CXR_HOST / CXR_PORT, default 127.0.0.1:7860

Settings (environment): CXR_USERS="name:pw,..." (demo) and/or a users file (CXR_USERS_FILE,
default .cxr/users.json; `python -m pipeline.viewer.auth add NAME [--role reviewer]`), CXR_REVIEWERS
(demo users with the reviewer role: the review tab and routes); the resource limits of
pipeline/viewer/limits.py (upload size, pixels, bodies, deadlines, connections, analyses in flight,
trusted proxies). Gradio runs with analytics off, no share link, no `allowed_paths` (the workspace
is blocked outright), uploads capped by `max_file_size`, files never analysed deleted after
CXR_UPLOAD_TTL_S, and its temp dir in a private folder outside the workspace (tempdir.py). The
Blocks are marked launched, so Gradio's own path check is in force: an event can name only a file
in that folder. Every route but the login page's and the health check needs a login
(pipeline/viewer/gate.py); failed logins are throttled (CXR_AUTH_*; see auth.py).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
AUTH_MESSAGE = "Chest X-ray viewer — research tool, not a medical device."


def _private_temp_dir() -> str:
    """Gradio stores uploads in GRADIO_TEMP_DIR: give it a private (0700) folder of this process's own,
    inside the folder GRADIO_TEMP_DIR names (or the system temp dir), before Gradio is imported."""
    import atexit

    from pipeline.viewer import tempdir

    base = os.environ.get("GRADIO_TEMP_DIR")
    if base and tempdir.is_own(base):   # a second app in this process: a sibling of the first one's folder
        base = str(Path(base).parent)
    path = str(tempdir.make_private_dir(base))
    os.environ["GRADIO_TEMP_DIR"] = path
    atexit.register(tempdir.remove, path)   # a normal exit; signals: pipeline/viewer/server.py
    return path


def create_app(root: str | os.PathLike = ".", users=None, *, max_upload_mb: float | None = None,
               queue_size: int | None = None, limits=None):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    temp_dir = _private_temp_dir()

    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Mount

    from pipeline.viewer.api import install_error_handlers, router
    from pipeline.viewer.auth import DEFAULT_USERS_FILE, LoginThrottle, TooManyFailures, Users, log_in
    from pipeline.viewer.card import model_card
    from pipeline.viewer.gate import Gate, client_address
    from pipeline.viewer.inference import NoModel, ServedModels
    from pipeline.viewer.limits import Limits
    from pipeline.viewer.review import ReviewFilms
    from pipeline.viewer.review_ui import CSS as REVIEW_CSS
    from pipeline.viewer.ui import CSS, build_ui

    root = Path(root).resolve()
    users = users if users is not None else Users.load(root / DEFAULT_USERS_FILE
                                                       if not os.environ.get("CXR_USERS_FILE") else None)
    if not users:
        raise SystemExit("error: no viewer users: set CXR_USERS='name:password' (demo) or add one with "
                         "`python -m pipeline.viewer.auth add NAME`")
    limits = limits or Limits.from_env(max_upload_mb=max_upload_mb, queue_size=queue_size)
    max_bytes = limits.max_upload_bytes
    throttle = LoginThrottle.from_env()
    models = ServedModels(root, max_pixels=limits.max_pixels)
    try:
        models.load()   # once, at start; a model trained later is picked up on the next request
    except NoModel as err:
        log.warning("%s", err)

    def card() -> dict:
        models.load()
        return model_card(root, models.latest_info, models.latest.meta, models.latest.sha256,
                          models.baseline.meta if models.baseline else None)

    app = FastAPI(title="CXR refine viewer", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.error("internal error: %s", type(exc).__name__)
        return JSONResponse({"error": "internal error"}, status_code=500)

    films = ReviewFilms(models)
    app.include_router(router(models, users, max_bytes, card, throttle, limits.max_inflight, films,
                              limits.feedback_body_bytes))

    async def gradio_login(name: str, password: str) -> bool:
        """The Gradio login form's check, the REST API's (429 while locked out); Gradio awaits it on the
        event loop, so the scrypt runs in a worker thread."""
        from starlette.concurrency import run_in_threadpool

        try:
            return await run_in_threadpool(log_in, users, throttle, client_address(), name, password)
        except TooManyFailures as err:
            raise HTTPException(429, detail=str(err), headers={"Retry-After": str(err.retry_after)}) from None

    ttl = limits.upload_ttl_s
    demo = build_ui(models, card, max_bytes=max_bytes, delete_cache=(max(1, int(min(60.0, ttl / 2))), max(1, int(ttl))),
                    users=users, films=films)
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    app = gr.mount_gradio_app(
        app, demo, path="/", auth=gradio_login, auth_message=AUTH_MESSAGE,
        allowed_paths=None, blocked_paths=[str(root)], max_file_size=max_bytes, show_error=False,
        ssr_mode=False, footer_links=[], run_history=False,
        app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None}, theme=gr.themes.Default(), css=CSS + REVIEW_CSS,
        server_name=os.environ.get("CXR_HOST", DEFAULT_HOST),
        server_port=int(os.environ.get("CXR_PORT", DEFAULT_PORT)))
    # mount_gradio_app, unlike launch(), leaves the Blocks unmarked, and Gradio skips its check of the
    # paths an event names (upload folder only, blocked_paths) for Blocks that never launched
    demo.has_launched = True
    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens"))
    app.add_middleware(Gate, gradio_app=gradio_app, auth_message=AUTH_MESSAGE, limits=limits)
    app.state.models, app.state.temp_dir, app.state.throttle, app.state.limits = models, temp_dir, throttle, limits
    return app


def main() -> None:
    from pipeline.viewer import tempdir
    from pipeline.viewer.server import serve

    logging.basicConfig(level=os.environ.get("CXR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = os.environ.get("CXR_HOST", DEFAULT_HOST), int(os.environ.get("CXR_PORT", DEFAULT_PORT))
    try:
        app = create_app(os.environ.get("CXR_ROOT", "."))
    except ValueError as err:  # a malformed CXR_USERS or limit
        sys.exit(f"error: {err}")
    log.info("viewer on http://%s:%d/ (API under /api/v1)", host, port)
    serve(app, host, port, app.state.limits, cleanup=lambda: tempdir.remove(app.state.temp_dir))


if __name__ == "__main__":
    main()
