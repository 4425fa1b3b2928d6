"""The viewer attacked as a hostile user would, at the limits users run with (README "Reliability",
area "attacks").

One viewer runs at the default limits (20 MB uploads, 20 Mpixel, 4 kB anonymous bodies, 10 s header
deadline, 100 connections, 4 REST analyses in flight) over the tiny trained project; a second, with
no model, takes the login attacks (its throttle window is short, so a lock-out ends within the test).
Each test sends the attack that worked before the fix and asserts what must hold now, beside a
control that shows the route still does its job.
"""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import tiny_params
from tests.reliability import record
from tests.viewer_support import PASSWORD, USER, film, png, serve_cycle, start_viewer, trained_project

MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def health_ms(viewer) -> float:
    t = time.perf_counter()
    r = httpx.get(viewer.url + "/api/v1/health", timeout=10)
    assert r.status_code == 200
    return (time.perf_counter() - t) * 1000


def private_dirs(viewer) -> list[Path]:
    return sorted(p for p in viewer.temp_dir.iterdir() if p.name.startswith("cxr-viewer-"))


def raw(viewer, data: bytes, read: bool = True, timeout: float = 30) -> bytes:
    """Send `data` on a fresh connection; the response bytes (until the server closes or 64 kB)."""
    host, port = viewer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not read:
            return b""
        out = b""
        try:
            while len(out) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture(scope="module")
def attacked():
    """The viewer at the default limits over the trained tiny project."""
    viewer = start_viewer(trained_project(), f"attacked-{uuid.uuid4().hex[:6]}", default_limits=True)
    yield viewer
    viewer.stop()


@contextmanager
def signed_in(viewer):
    """A client holding a Gradio session cookie."""
    with httpx.Client(base_url=viewer.url, timeout=60) as c:
        r = c.post("/login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 200, r.text
        yield c


def upload_dependency(client: httpx.Client) -> tuple[int, int]:
    """(fn_index, trigger id) of the upload event, from the config a signed-in client gets."""
    cfg = client.get("/config").json()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
    for k, dep in enumerate(cfg["dependencies"]):
        for target, event in dep["targets"]:
            if event == "upload" and ids.get(target) == "upload":
                return dep.get("id", k), target
    raise AssertionError("no upload event in the config")


def gradio_event(client: httpx.Client, file_path: str, dep: tuple[int, int]) -> dict:
    """Send the upload event naming `file_path` (as the browser does after an upload); its final message."""
    session = uuid.uuid4().hex[:10]
    data = {"path": file_path, "meta": {"_type": "gradio.FileData"}, "orig_name": "film.png"}
    r = client.post("/gradio_api/queue/join", json={"data": [data], "fn_index": dep[0], "trigger_id": dep[1],
                                                    "session_hash": session, "event_data": None})
    assert r.status_code == 200, r.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") in ("process_completed", "unexpected_error", "close_stream"):
                    return msg
    raise AssertionError("the event never completed")


def analysed(msg: dict) -> bool:
    return bool(msg.get("success")) and "Cycle" in json.dumps(msg.get("output", {}).get("data", ""))


def _answer(msg: dict) -> str:
    """An event's final message without what differs from one run to the next (ids, timings)."""
    timing = ("event_id", "avg_time", "cache_duration", "average_duration")
    out = {k: v for k, v in msg.items() if k not in timing}
    if isinstance(out.get("output"), dict):
        out["output"] = {k: v for k, v in out["output"].items() if k not in timing}
    return json.dumps(out, sort_keys=True)


def upload(client: httpx.Client, name: str, data: bytes) -> str:
    r = client.post("/gradio_api/upload", files={"files": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()[0]


# -- 1, 2: the upload event reads only the viewer's own uploads, and cannot freeze it -------------------

def test_an_upload_event_reads_only_a_file_uploaded_to_the_viewer(attacked):
    with signed_in(attacked) as c:
        dep = upload_dependency(c)
        good = upload(c, "film.png", png(film(128)))
        assert analysed(gradio_event(c, good, dep))   # control: the route analyses a real upload

        private = private_dirs(attacked)[0]
        outside = attacked.temp_dir / "outside.png"         # a film outside the upload folder
        outside.write_bytes(png(film(128)))
        figure = next(attacked.root.glob("reports/**/*.png"), None) or attacked.root / "params.yaml"
        link = private / "link.png"
        link.symlink_to(figure)
        big = private / "big" / "huge.png"                  # inside the folder but over the size limit
        big.parent.mkdir()
        with open(big, "wb") as fh:
            fh.write(png(film(128)))
            fh.truncate(21 * MB)
        cases = {"absolute path": "/etc/hostname", "outside the upload folder": str(outside),
                 "workspace file": str(figure), "symlink in the upload folder": str(link),
                 "missing path": "/no/such/file.png", "missing in the upload folder": str(private / "gone.png"),
                 "relative path": "../../etc/hostname", "over the size limit": str(big), "/dev/zero": "/dev/zero",
                 "/proc/self/environ": "/proc/self/environ"}
        answers = {}
        for name, path in cases.items():
            msg = gradio_event(c, path, dep)
            assert not analysed(msg), name
            answers[name] = _answer(msg)
        # outside the upload folder, a file that exists and one that does not get the same answer (inside it,
        # only files Gradio stored are found, and their names hold a hash of their content)
        inside = ("missing in the upload folder", "over the size limit", "symlink in the upload folder")
        outside_answers = {v for k, v in answers.items() if k not in inside}
        assert len(outside_answers) == 1, answers
        assert outside.is_file() and figure.is_file()       # nothing outside the folder was touched
    record("attacks.upload_event_paths", cases=len(cases), leaked=0, distinct_answers_outside=len(outside_answers))


def test_dev_zero_and_huge_files_in_an_event_do_not_stall_the_server(attacked):
    with signed_in(attacked) as c:
        dep = upload_dependency(c)
        rss0 = rss_mb(attacked.proc.pid)
        done = threading.Event()
        results = []

        def attack():
            for path in ("/dev/zero", "/dev/urandom", "/proc/kcore", "/dev/zero"):
                results.append(gradio_event(c, path, dep))
            done.set()

        threading.Thread(target=attack, daemon=True).start()
        slowest = 0.0
        while not done.wait(0.05):
            slowest = max(slowest, health_ms(attacked))
        slowest = max(slowest, health_ms(attacked))
        assert done.is_set() and len(results) == 4 and not any(analysed(m) for m in results)
        assert slowest < 1000, f"health took {slowest:.0f} ms while the events were refused"
        grew = rss_mb(attacked.proc.pid) - rss0
        assert grew < 50, f"RSS grew {grew:.0f} MB"
    record("attacks.device_files", cases=4, health_max_ms=round(slowest, 1), rss_growth_mb=round(grew, 1))


# -- 3: anonymous bodies ---------------------------------------------------------------------------

def test_anonymous_bodies_are_capped_and_the_login_form_takes_no_file(attacked):
    pid = attacked.proc.pid
    field = b"a" * MB
    rss0 = rss_mb(pid)
    statuses = []
    for k in range(20):
        if k % 2 == 0:   # declared: 1,000 urlencoded fields of 1 MB
            head = (f"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {1000 * (len(field) + 4)}\r\n\r\n").encode()
            statuses.append(status_of(raw(attacked, head + b"f=" + field[:200_000])))
        else:            # chunked: no length declared, 8 MB streamed
            head = (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % len(field) + b"f" * len(field) + b"\r\n"
            statuses.append(status_of(raw(attacked, head + chunk * 8 + b"0\r\n\r\n")))
    grew = rss_mb(pid) - rss0
    assert statuses == [413] * 20, statuses
    assert grew < 50, f"RSS grew {grew:.0f} MB over 20 oversized anonymous bodies"
    # a file part in a login is refused before any part is spooled; the login page's multipart fields pass
    spooled_before = {p for p in Path("/tmp").glob("tmp*") if p.is_file()}
    r = httpx.post(attacked.url + "/login", files={"username": (None, USER), "password": (None, PASSWORD),
                                                    "f": ("x.bin", b"0" * 2000)}, timeout=30)
    assert r.status_code == 415, r.text
    assert {p for p in Path("/tmp").glob("tmp*") if p.is_file()} <= spooled_before
    r = httpx.post(attacked.url + "/login", files={"username": (None, USER), "password": (None, PASSWORD)})
    assert r.status_code == 200, r.text   # what Gradio's own login page sends (FormData)
    assert httpx.post(attacked.url + "/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    assert httpx.post(attacked.url + "/login", content=b"<x/>", headers={"Content-Type": "text/xml"}).status_code == 415
    record("attacks.anonymous_bodies", cases=22, refused=22, rss_growth_mb=round(grew, 1))


# -- 4: no patient file outlives the viewer ---------------------------------------------------------

@pytest.fixture(scope="module")
def short_lived():
    """A viewer (no model) at the default limits but for two deadlines a test can wait out: uploads
    live 2 s (600 by default), bodies 3 s (120)."""
    from tests.viewer_support import untrained_project

    viewer = start_viewer(untrained_project(), f"short-{uuid.uuid4().hex[:6]}", default_limits=True,
                          extra_env={"CXR_UPLOAD_TTL_S": "2", "CXR_BODY_TIMEOUT_S": "3"})
    yield viewer
    viewer.stop()


def test_an_upload_never_analysed_is_deleted_and_one_request_carries_one_file(short_lived):
    viewer = short_lived
    with signed_in(viewer) as c:
        stored = Path(upload(c, "ZEBEDEE_MARGARETHE.dcm", b"DICM" * 1000))
        assert stored.is_file()
        r = c.post("/gradio_api/upload", files=[("files", ("a.png", b"1" * 100, "image/png")),
                                                ("files", ("b.png", b"2" * 100, "image/png"))])
        assert r.status_code == 413, r.text
        boundary = "----WebKitFormBoundaryQx7ZkP3mA9"   # a browser's: mixed case
        body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{n}.png\"\r\n"
                       f"Content-Type: image/png\r\n\r\n{n * 50}\r\n" for n in "xyz") + f"--{boundary}--\r\n"
        r = c.post("/gradio_api/upload", content=body.encode(),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
        deadline = time.monotonic() + 15
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not stored.exists(), "an upload never analysed outlived CXR_UPLOAD_TTL_S"
        left = [p for p in viewer.temp_dir.rglob("*") if p.is_file()]
        assert not left, left
    record("attacks.upload_cleanup", cases=3, temp_files_left=0)


def test_sigterm_removes_the_upload_folder_and_a_restart_sweeps_what_sigkill_left():
    from tests.viewer_support import untrained_project

    root = untrained_project()
    first = start_viewer(root, f"term-{uuid.uuid4().hex[:6]}", default_limits=True)
    with signed_in(first) as c:
        upload(c, "DOE_JOHN.dcm", b"DICM" * 100)
    folder = private_dirs(first)
    assert len(folder) == 1 and any(folder[0].rglob("DOE_JOHN.dcm"))
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(30)
    assert not folder[0].exists(), "SIGTERM left the upload folder behind"
    assert not [p for p in first.temp_dir.rglob("*") if p.is_file()]

    # SIGKILL leaves it; the next viewer on the same folder removes it, but not a running viewer's
    killed = start_viewer(root, f"kill-{uuid.uuid4().hex[:6]}", default_limits=True)
    running = start_viewer(root, f"alive-{uuid.uuid4().hex[:6]}", default_limits=True,
                           extra_env={"GRADIO_TEMP_DIR": str(killed.temp_dir)})
    with signed_in(killed) as c:
        upload(c, "DOE_JANE.dcm", b"DICM" * 100)
    killed_dirs = set(private_dirs(killed))
    assert len(killed_dirs) == 2
    killed.proc.kill()
    killed.proc.wait(30)
    assert any(d.rglob("DOE_JANE.dcm") for d in killed_dirs)
    restarted = start_viewer(root, f"restart-{uuid.uuid4().hex[:6]}", default_limits=True,
                             extra_env={"GRADIO_TEMP_DIR": str(killed.temp_dir)})
    try:
        left = set(private_dirs(killed))   # the folder all three were started on
        assert not list(killed.temp_dir.rglob("DOE_JANE.dcm")), "the restart did not sweep the killed viewer's folder"
        assert len(left) == 2 and len(left & killed_dirs) == 1   # the running viewer's folder kept, a new one made
        assert httpx.get(running.url + "/api/v1/health").status_code == 200
        running.proc.send_signal(signal.SIGINT)   # Ctrl-C cleans up as SIGTERM does
        running.proc.wait(30)
        assert not (left & killed_dirs).pop().exists(), "SIGINT left the upload folder behind"
    finally:
        restarted.stop()
        running.stop()
    assert not [p for p in killed.temp_dir.rglob("*") if p.is_file()]
    record("attacks.signals", cases=4, temp_files_left=0)


# -- 5: deadlines and the connection cap ------------------------------------------------------------

def test_half_open_connections_are_closed_and_capped(attacked):
    host, port = attacked.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(120):   # more than the 100 connections allowed
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")   # never finished
        socks.append(s)
    time.sleep(0.5)
    over = status_of(raw(attacked, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert over == 503, over   # the cap holds, and says so at once
    t0 = time.monotonic()
    closed = 0
    for s in socks:
        s.settimeout(max(0.1, 25 - (time.monotonic() - t0)))
        try:
            if s.recv(1024) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass
        s.close()
    held = time.monotonic() - t0
    assert closed == len(socks), f"{len(socks) - closed} half-open connections were still held after {held:.0f} s"
    assert health_ms(attacked) < 1000
    record("attacks.half_open", cases=len(socks), closed=closed, held_max_s=round(held, 1), status_over_cap=over)


def test_a_slow_body_is_cut_at_the_body_deadline(short_lived):
    viewer = short_lived
    host, port = viewer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: 1000\r\n\r\nusername=")
        t0 = time.monotonic()
        s.settimeout(0.5)
        while time.monotonic() - t0 < 20:   # a byte every half second, for as long as the server lets it
            try:
                s.sendall(b"a")
                if s.recv(1024) == b"":
                    break
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        held = time.monotonic() - t0
    assert held < 10, f"a slow body held its connection {held:.0f} s"
    record("attacks.slow_body", cases=1, held_s=round(held, 1))


# -- 6: analyses in flight and the pixel limit -------------------------------------------------------

def test_concurrent_predicts_beyond_the_limit_get_429_and_memory_stays_bounded(attacked):
    big = png(film(256)) + b"\0" * (15 * MB)   # a real film padded to 15 MB: read in full before decoding
    auth = (USER, PASSWORD)
    httpx.post(attacked.url + "/api/v1/predict", auth=auth, files={"file": ("f.png", png(film(128)))}, timeout=60)
    rss0 = rss_mb(attacked.proc.pid)

    def one(_):
        r = httpx.post(attacked.url + "/api/v1/predict", auth=auth, files={"file": ("f.png", big)}, timeout=120)
        return r.status_code, r.headers.get("retry-after")

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    peak = rss_mb(attacked.proc.pid) - rss0
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
    assert all(ra and int(ra) > 0 for c, ra in results if c == 429)
    assert peak < 600, f"RSS grew {peak:.0f} MB over 24 concurrent 15 MB predicts"
    record("attacks.inflight", cases=24, ok=codes.count(200), busy_429=codes.count(429), rss_growth_mb=round(peak, 1))


def test_the_viewer_has_a_pixel_limit_of_its_own(attacked):
    auth = (USER, PASSWORD)
    huge = png(np.zeros((5000, 5000), np.uint8))   # 25 Mpixel in a few kB: fine for training, not here
    assert len(huge) < 200_000
    t = time.perf_counter()
    r = httpx.post(attacked.url + "/api/v1/predict", auth=auth, files={"file": ("f.png", huge)}, timeout=60)
    ms = (time.perf_counter() - t) * 1000
    assert r.status_code == 422 and "pixel" in r.json()["error"], r.text
    assert ms < 1000
    ok = png(np.zeros((4000, 4000), np.uint8) + film(4000) // 2)  # 16 Mpixel, a flat-panel film's size
    assert httpx.post(attacked.url + "/api/v1/predict", auth=auth, files={"file": ("f.png", ok)},
                      params={"heatmaps": "false"}, timeout=120).status_code == 200
    record("attacks.pixels", cases=2, refused=1, refused_ms=round(ms, 1))


# -- headers --------------------------------------------------------------------------------------

def test_security_headers_and_no_reflected_forwarded_host(attacked):
    evil = "evil-host.example"
    for path in ("/", "/api/v1/health", "/login"):
        r = httpx.get(attacked.url + path, headers={"X-Forwarded-Host": evil, "X-Forwarded-Proto": "https"})
        assert r.headers.get("x-frame-options") == "DENY", path
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), path
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert evil not in r.text and evil not in str(r.headers), path
    with signed_in(attacked) as c:
        r = c.get("/config", headers={"X-Forwarded-Host": evil})
        assert r.status_code == 200 and evil not in r.text
    record("attacks.headers", cases=4, reflected=0)


# -- 7 and the timing oracle: the login ----------------------------------------------------------------

NURSE, NURSE_PW = "nurse", "nurse-password-42"
DOCTOR, DOCTOR_PW = "doctor", "doctor-password-7"


def _auth_viewer(tmp: Path, name: str, **env):
    """A viewer (no model: an authenticated request gets 503) with two hashed users."""
    from pipeline.viewer.auth import add_user

    root = tmp / name
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    add_user(root / ".cxr" / "users.json", NURSE, NURSE_PW)
    add_user(root / ".cxr" / "users.json", DOCTOR, DOCTOR_PW)
    return start_viewer(root, name, default_limits=True, extra_env={"CXR_AUTH_WINDOW_S": "30", **env})


def _guess(viewer, name: str, password: str, **headers) -> int:
    return httpx.get(viewer.url + "/api/v1/model", auth=(name, password), headers=headers, timeout=30).status_code


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A viewer behind a trusted proxy (127.0.0.1): each X-Forwarded-For address is a client of its own."""
    viewer = _auth_viewer(tmp_path_factory.mktemp("proxied"), f"proxied-{uuid.uuid4().hex[:6]}",
                          CXR_TRUSTED_PROXIES="127.0.0.1")
    yield viewer
    viewer.stop()


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path, proxied):
    plain = _auth_viewer(tmp_path, f"xff-{uuid.uuid4().hex[:6]}")
    try:
        codes = [_guess(plain, f"guess{k}", "wrong", **{"X-Forwarded-For": f"10.9.{k}.{k}"}) for k in range(25)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes   # one client, however it says
    finally:
        plain.stop()
    # behind a trusted proxy each forwarded client has its own count, and the proxy's own address none
    codes = [_guess(proxied, f"guess{k}", "wrong", **{"X-Forwarded-For": f"10.9.{k}.{k}"}) for k in range(25)]
    assert set(codes) == {401}, codes
    record("attacks.forwarded_for", cases=50, spoofed_resets=0)


def test_a_locked_name_still_logs_in_from_the_address_it_used_before_and_logins_do_not_stall(proxied):
    viewer = proxied
    desk = {"X-Forwarded-For": "10.0.0.7"}
    assert _guess(viewer, NURSE, NURSE_PW, **desk) == 503   # authenticated; no model here: 503
    codes = [_guess(viewer, NURSE, f"wrong{k}", **{"X-Forwarded-For": "10.6.6.6"}) for k in range(7)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
    assert _guess(viewer, NURSE, NURSE_PW, **{"X-Forwarded-For": "10.6.6.6"}) == 429  # the guesser stays locked
    assert _guess(viewer, NURSE, NURSE_PW, **{"X-Forwarded-For": "10.1.1.1"}) == 429  # so does a new address
    assert _guess(viewer, NURSE, NURSE_PW, **desk) == 503   # the owner's desk is not locked out

    # unknown names cost a scrypt like known ones, and it runs off the event loop
    addresses = iter(range(250))   # one per attempt: the per-address limit stays out of the way

    def timed(name: str) -> float:
        t = time.perf_counter()
        r = httpx.post(viewer.url + "/login", data={"username": name, "password": "wrong-password"},
                       headers={"X-Forwarded-For": f"10.7.{next(addresses)}.1"}, timeout=30)
        assert r.status_code in (400, 401), r.status_code
        return time.perf_counter() - t

    unknown = [timed(f"nobody{k}") for k in range(4)]
    hashed = [timed(DOCTOR) for _ in range(4)]   # under its lock limit of 5
    ratio = float(np.median(unknown) / np.median(hashed))
    assert 0.5 < ratio < 2.0, (unknown, hashed)

    # off the event loop, 16 logins checked at once on 2 cores take well under 16 checked one after another
    one = float(np.median(hashed))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: timed(f"flood{k}"), range(16)))
    parallel = (time.perf_counter() - t0) / (16 * one)
    assert parallel < 0.85, f"16 concurrent logins took {parallel:.2f} x their serial time: checked on the loop?"
    record("attacks.login", cases=41, timing_ratio=round(ratio, 2), concurrent_vs_serial=round(parallel, 2))


def test_login_throttle_forgives_the_owners_address_only():
    from pipeline.viewer.auth import LoginThrottle

    now = [0.0]
    t = LoginThrottle(max_failures=3, window_s=60, max_failures_per_ip=10, clock=lambda: now[0])
    t.succeeded("10.0.0.7", "nurse")
    for _ in range(3):
        t.failed("10.6.6.6", "nurse")
    assert t.retry_after("10.6.6.6", "nurse") and t.retry_after("10.1.1.1", "nurse")
    assert t.retry_after("10.0.0.7", "nurse") is None          # the owner's desk
    assert t.retry_after("10.0.0.7", "doctor") is None          # another name from that desk: never locked
    for _ in range(10):
        t.failed("10.0.0.7", "someone")
    assert t.retry_after("10.0.0.7", "nurse")                   # the per-address limit still applies to it
    now[0] = 61.0
    assert t.retry_after("10.6.6.6", "nurse") is None           # and every lock ends with its window


# -- Low: in-process checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("view, expected", [("PA", "PA"), ("ap", "AP"), (" LL ", "LL"), ("DOE JOHN", None),
                                            ("JOHN", None), ("", None)])
def test_view_position_is_an_allow_list(tmp_path, view, expected):
    from pipeline.data.decode import decode
    from tests.fixtures.images import write_dicom

    path = write_dicom(tmp_path / "v.dcm", film(64), patient_id="X", view=view)
    assert decode(path.read_bytes(), max_pixels=10**6, id_salt="").view == expected


def test_a_hot_reload_never_mixes_two_models_in_one_analysis(tmp_path):
    """The swap lands the instant the analysis releases the models' lock: labels and thresholds must come
    from the model that produced the probabilities."""
    import shutil

    from pipeline.viewer.inference import ServedModels

    project = tmp_path / "p"
    shutil.copytree(trained_project() / "models", project / "models")
    shutil.copy(trained_project() / "params.yaml", project / "params.yaml")
    serve_cycle(project, 1)
    models = ServedModels(project)
    models.load()
    first, other = models.latest, models.baseline
    assert first is not other and first.meta["thresholds"] != other.meta["thresholds"]

    class SwapOnRelease:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            return self.lock.__enter__()

        def __exit__(self, *exc):
            out = self.lock.__exit__(*exc)
            models.latest, models.baseline = other, first   # a new latest.json, loaded by another request
            return out

    models._lock = SwapOnRelease(models._lock)
    a = models.analyse(png(film(128)))
    assert a.latest.cycle == first.cycle
    assert a.thresholds == [float(t) for t in first.meta["thresholds"]]
    assert a.labels == list(first.meta["labels"])


def test_anonymous_health_names_no_path_and_does_not_reload_a_broken_model(tmp_path, monkeypatch):
    import shutil

    from fastapi.testclient import TestClient

    import pipeline.viewer.inference as inference_module
    from pipeline.viewer.app import create_app
    from pipeline.viewer.auth import Users

    root = tmp_path / "broken"
    shutil.copytree(trained_project(), root, ignore=shutil.ignore_patterns(".dvc", ".git", "data"))
    latest = json.loads((root / "models" / "latest.json").read_text())
    weights = root / latest["checkpoint"]
    weights = weights if weights.is_file() else weights / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])   # truncated
    calls = []
    real = inference_module.load_model
    monkeypatch.setattr(inference_module, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    app = create_app(root, Users(plain={"u": "p"}))
    with TestClient(app) as client:
        bodies = [client.get("/api/v1/health") for _ in range(5)]
    assert all(r.status_code == 200 and r.json()["status"] == "no_model" for r in bodies)
    text = " ".join(r.text for r in bodies)
    assert str(tmp_path) not in text and "/" + "models" not in text and ".safetensors" not in text, text
    assert len(calls) == 1, f"the broken checkpoint was loaded {len(calls)} times for 5 health checks"
