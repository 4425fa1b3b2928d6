"""One FastAPI app: the REST API under /api/v1 and the Gradio Blocks UI at /, both behind login.

    python -m pipeline.viewer            # or `make viewer`; CXR_HOST / CXR_PORT, default 127.0.0.1:7860

Settings (environment): CXR_USERS="name:pw,..." (demo) and/or a users file (CXR_USERS_FILE,
default .cxr/users.json; `python -m pipeline.viewer.auth add NAME`), CXR_MAX_UPLOAD_MB (20),
CXR_MAX_PIXELS (params' data.max_pixels), CXR_QUEUE_SIZE (32). Gradio runs with analytics off, no
share link, no `allowed_paths` (the workspace is blocked outright), uploads capped by
`max_file_size`, and its temp dir in a private folder outside the workspace. Every route but the
login page's and the health check needs a login (pipeline/viewer/gate.py); failed logins are
throttled (CXR_AUTH_MAX_FAILURES, CXR_AUTH_MAX_FAILURES_PER_IP, CXR_AUTH_WINDOW_S; see auth.py).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
AUTH_MESSAGE = "Chest X-ray viewer — research tool, not a medical device."


def _private_temp_dir() -> str:
    """Gradio stores uploads in GRADIO_TEMP_DIR: give it a private (0700) folder outside the workspace."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        import atexit
        import shutil

        path = tempfile.mkdtemp(prefix="cxr-viewer-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = path
    return os.environ["GRADIO_TEMP_DIR"]


def create_app(root: str | os.PathLike = ".", users=None, *, max_upload_mb: float | None = None,
               queue_size: int | None = None):
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
    from pipeline.viewer.auth import LoginThrottle, Users
    from pipeline.viewer.card import model_card
    from pipeline.viewer.engine import Engine, NoModel
    from pipeline.viewer.gate import Gate, client_address
    from pipeline.viewer.ui import CSS, build_ui

    root = Path(root).resolve()
    users = users if users is not None else Users.load(root / ".cxr" / "users.json"
                                                       if not os.environ.get("CXR_USERS_FILE") else None)
    if not users:
        raise SystemExit("error: no viewer users: set CXR_USERS='name:password' (demo) or add one with "
                         "`python -m pipeline.viewer.auth add NAME`")
    max_mb = float(max_upload_mb or os.environ.get("CXR_MAX_UPLOAD_MB") or 20)
    max_bytes = int(max_mb * 1024 * 1024)
    throttle = LoginThrottle.from_env()
    engine = Engine(root)
    try:
        engine.load()   # once, at start; a model trained later is picked up on the next request
    except NoModel as err:
        log.warning("%s", err)

    def card() -> dict:
        engine.load()
        return model_card(root, engine.latest_info, engine.latest.meta, engine.latest.sha256,
                          engine.baseline.meta if engine.baseline else None)

    app = FastAPI(title="CXR refine viewer", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.error("internal error: %s", type(exc).__name__)
        return JSONResponse({"error": "internal error"}, status_code=500)

    app.include_router(router(engine, users, max_bytes, card, throttle))

    def gradio_login(name: str, password: str) -> bool:
        """The Gradio login form's check, throttled like the REST API's (429 while locked out)."""
        client = client_address()
        wait = throttle.retry_after(client, name)
        if wait is not None:
            raise HTTPException(429, detail=f"too many failed logins: try again in {wait} s",
                                headers={"Retry-After": str(wait)})
        if users.check(name, password):
            return True
        throttle.failed(client, name)
        return False

    demo = build_ui(engine, card)
    demo.queue(default_concurrency_limit=1, max_size=int(queue_size or os.environ.get("CXR_QUEUE_SIZE") or 32))
    app = gr.mount_gradio_app(
        app, demo, path="/", auth=gradio_login, auth_message=AUTH_MESSAGE,
        allowed_paths=None, blocked_paths=[str(root)], max_file_size=max_bytes, show_error=False,
        ssr_mode=False, footer_links=[], run_history=False,
        app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None}, theme=gr.themes.Default(), css=CSS,
        server_name=os.environ.get("CXR_HOST", DEFAULT_HOST),
        server_port=int(os.environ.get("CXR_PORT", DEFAULT_PORT)))
    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens"))
    app.add_middleware(Gate, gradio_app=gradio_app, auth_message=AUTH_MESSAGE)
    app.state.engine, app.state.temp_dir, app.state.throttle = engine, temp_dir, throttle
    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=os.environ.get("CXR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = os.environ.get("CXR_HOST", DEFAULT_HOST), int(os.environ.get("CXR_PORT", DEFAULT_PORT))
    try:
        app = create_app(os.environ.get("CXR_ROOT", "."))
    except ValueError as err:  # a malformed CXR_USERS
        sys.exit(f"error: {err}")
    log.info("viewer on http://%s:%d/ (API under /api/v1)", host, port)
    # access log off: request lines would carry nothing identifying, but there is no need for them
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
