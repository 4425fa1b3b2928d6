"""One FastAPI app: the REST API under /api/v1 and the Gradio Blocks UI at /, both behind login.

    python -m pipeline.viewer            # or `make viewer`; CXR_HOST / CXR_PORT, default 127.0.0.1:7860

Settings (environment): CXR_USERS="name:pw,..." (demo) and/or a users file (CXR_USERS_FILE,
default .cxr/users.json; `python -m pipeline.viewer.auth add NAME`), CXR_MAX_UPLOAD_MB (20),
CXR_MAX_PIXELS (params' data.max_pixels), CXR_QUEUE_SIZE (32). Gradio runs with analytics off, no
share link, no `allowed_paths` (the workspace is blocked outright), uploads capped by
`max_file_size`, and its temp dir in a private folder outside the workspace.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


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
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pipeline.viewer.api import install_error_handlers, router
    from pipeline.viewer.auth import Users
    from pipeline.viewer.card import model_card
    from pipeline.viewer.engine import Engine, NoModel
    from pipeline.viewer.ui import CSS, build_ui

    root = Path(root).resolve()
    users = users if users is not None else Users.load(root / ".cxr" / "users.json"
                                                       if not os.environ.get("CXR_USERS_FILE") else None)
    if not users:
        raise SystemExit("error: no viewer users: set CXR_USERS='name:password' (demo) or add one with "
                         "`python -m pipeline.viewer.auth add NAME`")
    max_mb = float(max_upload_mb or os.environ.get("CXR_MAX_UPLOAD_MB") or 20)
    max_bytes = int(max_mb * 1024 * 1024)
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

    app.include_router(router(engine, users, max_bytes, card))
    demo = build_ui(engine, card)
    demo.queue(default_concurrency_limit=1, max_size=int(queue_size or os.environ.get("CXR_QUEUE_SIZE") or 32))
    app = gr.mount_gradio_app(
        app, demo, path="/", auth=users.check, auth_message="Chest X-ray viewer — research tool, not a medical device.",
        allowed_paths=None, blocked_paths=[str(root)], max_file_size=max_bytes, show_error=False,
        ssr_mode=False, footer_links=[], run_history=False,
        app_kwargs={"docs_url": None, "redoc_url": None, "openapi_url": None}, theme=gr.themes.Default(), css=CSS,
        server_name=os.environ.get("CXR_HOST", DEFAULT_HOST),
        server_port=int(os.environ.get("CXR_PORT", DEFAULT_PORT)))
    app.state.engine, app.state.temp_dir = engine, temp_dir
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
