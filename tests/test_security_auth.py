"""Auth and routes (the reliability suite, `make reliability`): every route the app registers
(FastAPI's and the mounted Gradio app's) refuses an anonymous request with 401, except a justified
allow-list; path traversal on the file and static routes never returns a file; failed logins are
throttled (429 + Retry-After) on the REST API and on the Gradio login, per user name and per
client, and the lock-out ends with its window.

The viewer tests run their own server (tests/viewer_support.start_viewer) with a 5 s throttle window,
so the shared viewer of the other tests is never locked out.
"""
from __future__ import annotations

import base64
import http.client
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
import yaml

from tests.conftest import ROOT, tiny_params
from tests.reliability import record
from tests.viewer_support import PASSWORD, USER

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

WINDOW_S, MAX_USER, MAX_IP = 5.0, 5, 12
NURSE, NURSE_PW = "nurse", "nurse-password-42"        # users of the hashed users file
DOCTOR, DOCTOR_PW = "doctor", "doctor-password-7"
PORTER, PORTER_PW = "porter", "porter-password-9"    # never logs in before its lock-out is tested (a good
                                                     # login from an address exempts it from that user's lock)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Our own viewer, over a project holding the secrets a traversal would be after: params.yaml,
    a hashed users file (.cxr/users.json) and the id salt (.cxr/id_salt). No model: the gate and
    the throttle sit in front of the engine."""
    from pipeline.viewer.auth import add_user
    from tests.viewer_support import start_viewer

    root = tmp_path_factory.mktemp("guarded")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".cxr").mkdir()
    salt = uuid.uuid4().hex
    (root / ".cxr" / "id_salt").write_text(salt)
    add_user(root / ".cxr" / "users.json", NURSE, NURSE_PW)
    add_user(root / ".cxr" / "users.json", DOCTOR, DOCTOR_PW)
    add_user(root / ".cxr" / "users.json", PORTER, PORTER_PW)
    viewer = start_viewer(root, f"guarded-{uuid.uuid4().hex[:6]}", extra_env={
        "CXR_AUTH_WINDOW_S": str(WINDOW_S), "CXR_AUTH_MAX_FAILURES": str(MAX_USER),
        "CXR_AUTH_MAX_FAILURES_PER_IP": str(MAX_IP)})
    viewer.salt = salt
    yield viewer
    viewer.stop()


def _routes(root: Path) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app as built by create_app, Gradio's included."""
    from starlette.routing import Mount

    from pipeline.viewer.app import create_app
    from pipeline.viewer.auth import Users

    out: list[tuple[str, str]] = []

    def walk(routes, prefix=""):
        for r in routes:
            if isinstance(r, Mount):
                walk(getattr(r.app, "routes", None) or [], prefix + r.path)
            elif hasattr(r, "effective_candidates"):  # FastAPI's included router
                walk(r.effective_candidates(), prefix)
            else:
                orig = getattr(r, "original_route", r)
                for m in sorted(getattr(orig, "methods", None) or ["WEBSOCKET"]):
                    out.append((m, prefix + r.path))
    walk(create_app(root, users=Users(plain={"x": "y"})).routes)
    return sorted(set(out))


# Anonymous requests that must work, and why. Everything else registered must answer 401.
ALLOWED_ANONYMOUS = {
    ("GET", "/api/v1/health"): "the documented open health check (no data, no model details)",
    ("GET", "/"): "the login page (with no session Gradio serves the login form's config only)",
    ("HEAD", "/"): "the same page's headers",
    ("POST", "/login"): "the login form posts here",
    ("POST", "/login/"): "the same with a trailing slash (Gradio registers both)",
    ("GET", "/theme.css"): "the login page's stylesheet",
    ("GET", "/favicon.ico"): "the login page's icon",
    ("GET", "/assets/{path:path}"): "the login page's JavaScript and CSS, from the installed gradio package",
    ("GET", "/static/{path:path}"): "fonts and scripts of the login page, from the installed gradio package",
}
FILL = {"path": "index.js", "path_or_url": "/etc/hostname", "url_path": "http://127.0.0.1:9/x", "size": "192",
        "component_id": "1", "segment_id": "0", "ext": "ts", "environment": "client", "api_name": "predict",
        "event_id": "0", "session_hash": "abc", "run": "0", "key": "x", "id": "x", "type": "x",
        "file_name": "x"}
BODIES = {"POST": {"json": {"data": [], "fn_index": 0, "session_hash": "abc", "event_id": "0",
                            "trigger_id": 0, "component_id": 0, "fn_name": "x", "hash": "x", "prompt": "x"}}}


def _url(template: str) -> str:
    return re.sub(r"\{([^}:]+)(:path)?\}", lambda m: FILL.get(m.group(1), "x"), template)


def _status(method: str, url: str, **kw) -> tuple[int, bytes]:
    """Status and the first bytes of the body (streams such as the heartbeat never end)."""
    with httpx.stream(method, url, timeout=httpx.Timeout(10, read=3), **kw) as r:
        body = b""
        try:
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > 4096:
                    break
        except httpx.ReadTimeout:
            pass
        return r.status_code, body


def test_every_registered_route_refuses_an_anonymous_request(guarded, tmp_path, monkeypatch):
    for name in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "GRADIO_SSR_MODE"):
        monkeypatch.setenv(name, os.environ.get(name, "False" if name != "HF_HUB_OFFLINE" else "1"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "root").mkdir()
    routes = _routes(tmp_path / "root")
    assert len(routes) > 40 and ("POST", "/api/v1/predict") in routes and ("POST", "/gradio_api/upload") in routes
    assert set(ALLOWED_ANONYMOUS) <= set(routes), set(ALLOWED_ANONYMOUS) - set(routes)
    open_, refused, wrong = [], 0, []
    for method, template in routes:
        if method == "WEBSOCKET":
            continue
        url = guarded.url + _url(template)
        status, body = _status(method, url, **(BODIES.get(method, {})))
        if (method, template) in ALLOWED_ANONYMOUS:
            open_.append((method, template, status))
            continue
        refused += status == 401
        if status != 401:
            wrong.append((method, template, status, body[:120]))
    assert wrong == []
    # the open routes give the login page and nothing more
    status, page = _status("GET", guarded.url + "/")
    assert status == 200 and b"auth_required" in page
    for private in (b"Model card", b"Chest X-ray: PNG", b"phantom", b"upload"):
        assert private not in page.replace(b"auth_message", b""), private
    assert _status("GET", guarded.url + "/api/v1/health")[0] == 200
    # the gate closes an anonymous websocket too, but none is registered: a new one needs a test here
    assert not [p for m, p in routes if m == "WEBSOCKET"]
    record("auth.routes", routes=len(routes), anonymous_401=refused, allowed=len(open_),
           allow_list=sorted(f"{m} {p}" for m, p in ALLOWED_ANONYMOUS))


@contextmanager
def _login(viewer, user=NURSE, password=NURSE_PW):
    """A client holding a Gradio session cookie."""
    with httpx.Client(base_url=viewer.url, timeout=30) as c:
        r = c.post("/login", data={"username": user, "password": password})
        assert r.status_code == 200, r.text
        yield c


def _raw_get(viewer, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET `path` byte for byte (httpx would normalise dot segments and re-encode)."""
    u = urlsplit(viewer.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read(65536)
    finally:
        conn.close()


def _traversals(target: Path, cwd_relative: str | None) -> list[str]:
    """Many spellings of a request for `target` through the file and static routes."""
    abs_ = str(target)
    rel = abs_.lstrip("/")
    up = "../" * 12
    enc = lambda s: s.replace(".", "%2e").replace("/", "%2f")  # noqa: E731
    dbl = lambda s: s.replace(".", "%252e").replace("/", "%252f")  # noqa: E731
    paths = []
    for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/static/", "/assets/", "/svelte/",
                  "/gradio_api/proxy=", "/api/v1/"):
        paths += [route + abs_, route + up + rel, route + enc(up + rel), route + dbl(up + rel),
                  route + up.replace("/", "\\") + rel.replace("/", "\\"), route + "..%2f" * 12 + rel,
                  route + "%2e%2e/" * 12 + rel, route + quote(abs_, safe=""), route + "file://" + abs_,
                  route + "/" + up + rel, route + "....//" * 12 + rel]
    if cwd_relative:
        paths += [f"/gradio_api/file={cwd_relative}", f"/gradio_api/file=./{cwd_relative}",
                  f"/file={cwd_relative}", f"/gradio_api/file={quote(cwd_relative, safe='')}"]
    return paths


def test_path_traversal_never_returns_a_file(guarded):
    root = guarded.root
    params_text = (root / "params.yaml").read_text()
    targets = {
        Path("/etc/passwd"): (b"root:", None),
        root / "params.yaml": (params_text.splitlines()[1].encode(), None),
        root / ".cxr" / "users.json": (b"scrypt$", None),
        root / ".cxr" / "id_salt": (guarded.salt.encode(), None),
        ROOT / "params.yaml": (b"image_size", "params.yaml"),                 # the server's own cwd
        ROOT / "pipeline" / "viewer" / "auth.py": (b"hash_password", "pipeline/viewer/auth.py"),
    }
    with _login(guarded) as client:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        basic = "Basic " + base64.b64encode(f"{NURSE}:{NURSE_PW}".encode()).decode()
        attempts, statuses = 0, {}
        for target, (content, rel) in targets.items():
            assert target.is_file()
            for path in _traversals(target, rel):
                anon, body = _raw_get(guarded, path)
                assert content not in body, (path, anon)
                # the REST API answers for itself: no such route
                assert anon == 401 or (path.startswith("/api/v1/") and anon == 404), (path, anon, body[:200])
                for headers in ({"Cookie": cookie}, {"Authorization": basic}):
                    status, body = _raw_get(guarded, path, headers)
                    assert content not in body, (path, status)
                    assert status in (400, 401, 403, 404), (path, status, body[:200])
                    statuses[status] = statuses.get(status, 0) + 1
                    attempts += 1
        # an upload whose file name climbs out of the temp dir is stored inside it
        escape = Path("/tmp") / f"cxr-escape-{uuid.uuid4().hex}.txt"
        for name in (f"../../../../../..{escape}", str(escape), "..\\..\\..\\" + escape.name):
            r = client.post("/gradio_api/upload", files=[("files", (name, b"not an image"))])
            assert r.status_code == 200, r.text
            (stored,) = r.json()
            assert Path(stored).resolve().is_relative_to(guarded.temp_dir.resolve()), stored
            assert not escape.exists()
            Path(stored).unlink()
            attempts += 1
    record("auth.traversal", attempts=attempts, leaked=0, statuses={str(k): v for k, v in sorted(statuses.items())})


def _basic(viewer, user, password, **headers) -> httpx.Response:
    return httpx.get(viewer.url + "/api/v1/model", auth=(user, password), headers=headers, timeout=30)


def _authenticated(r: httpx.Response) -> bool:
    """Past the login: 200, or 503 because this viewer has no model."""
    return r.status_code in (200, 503)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_wrong_passwords_lock_out_the_user_on_the_rest_api_until_the_window_ends(guarded):
    t0 = time.monotonic()
    for _ in range(MAX_USER):
        assert _basic(guarded, PORTER, "wrong-password").status_code == 401
    locked = _basic(guarded, PORTER, PORTER_PW)              # the right password, during the lock-out
    assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
    assert locked.status_code == 429, locked.text
    assert 1 <= int(locked.headers["retry-after"]) <= WINDOW_S + 1
    assert "try again" in locked.json()["error"]
    assert _basic(guarded, PORTER, "wrong-again").status_code == 429
    # another user from the same client is not locked out by the porter's failures
    assert _authenticated(_basic(guarded, USER, PASSWORD))
    # nor can a spoofed X-Forwarded-For dodge the per-user lock (it is believed from CXR_TRUSTED_PROXIES only)
    assert _basic(guarded, PORTER, PORTER_PW, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    _sleep_until(t0 + WINDOW_S + 0.5)
    assert _authenticated(_basic(guarded, PORTER, PORTER_PW))  # the window passed: the user is back
    record("auth.rate_limit.rest", failures_before_429=MAX_USER, window_s=WINDOW_S,
           correct_password_refused_while_locked=True, other_user_unaffected=True, unlocked_after_window=True)


def test_the_gradio_login_is_throttled_too(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        t0 = time.monotonic()
        for _ in range(MAX_USER):
            r = c.post("/login", data={"username": DOCTOR, "password": "wrong-password"})
            assert r.status_code == 400
        r = c.post("/login", data={"username": DOCTOR, "password": DOCTOR_PW})
        assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
        assert not c.cookies and c.get("/config").status_code == 401
        # the REST API shares the throttle: the same user is locked out there too
        assert _basic(guarded, DOCTOR, DOCTOR_PW).status_code == 429
        _sleep_until(t0 + WINDOW_S + 0.5)
        r = c.post("/login", data={"username": DOCTOR, "password": DOCTOR_PW})
        assert r.status_code == 200 and c.get("/config").status_code == 200
    record("auth.rate_limit.gradio", failures_before_429=MAX_USER, window_s=WINDOW_S, unlocked_after_window=True)


def test_many_names_from_one_client_lock_out_the_client(guarded):
    """Failures under many names (the earlier tests' may still count) lock out the client address."""
    t0, guesses, r = time.monotonic(), 0, None
    while guesses < MAX_IP:
        r = _basic(guarded, f"guess-{guesses}", "x")
        guesses += 1
        if r.status_code == 429:
            break
        assert r.status_code == 401
    assert time.monotonic() - t0 < WINDOW_S, "too slow to test the window"
    r = _basic(guarded, USER, PASSWORD)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.status_code
    r = httpx.get(guarded.url + "/api/v1/model", headers={"Authorization": "Basic !!!"}, timeout=30)
    assert r.status_code == 429
    assert httpx.get(guarded.url + "/api/v1/health", timeout=30).status_code == 200  # open routes stay open
    _sleep_until(t0 + WINDOW_S + 0.5)
    assert _authenticated(_basic(guarded, USER, PASSWORD))
    record("auth.rate_limit.per_client", failures_per_client_before_429=MAX_IP, window_s=WINDOW_S)


def test_login_throttle_unit():
    from pipeline.viewer.auth import LoginThrottle

    now = [0.0]
    t = LoginThrottle(max_failures=3, window_s=60, max_failures_per_ip=5, clock=lambda: now[0], max_keys=50)
    for _ in range(3):
        assert t.retry_after("1.1.1.1", "ann") is None
        t.failed("1.1.1.1", "ann")
        now[0] += 1
    assert t.retry_after("1.1.1.1", "ann") == 57          # until the first failure (t=0) is 60 s old (now t=3)
    assert t.retry_after("2.2.2.2", "ann") == 57          # per user, from anywhere
    assert t.retry_after("1.1.1.1", "bob") is None        # the client has 3 of its 5
    now[0] = 60.5
    assert t.retry_after("1.1.1.1", "ann") is None        # the oldest failure left the window
    for k in range(5):
        t.failed("3.3.3.3", f"u{k}")
    assert t.retry_after("3.3.3.3", "someone") is not None and t.retry_after("4.4.4.4", "u0") is None
    for k in range(500):                                  # memory stays bounded
        t.failed(f"10.0.{k // 250}.{k % 250}", f"name-{k}")
    assert len(t._failures) <= 50
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0)
