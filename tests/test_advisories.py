"""Known advisories in the viewer stack's installed versions: none (the reliability suite's auth
and routes area).

pip-audit first; where it cannot look a package up (offline, or an index without per-version data, as
here), PyPI's project JSON for the packages installed at their latest release. The rest are recorded
as not audited (a caveat in reports/reliability.json), and the test skips only when neither source
answers. It reaches the network, so it is marked `network`: `make reliability` runs it, `make test`
does not.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability import record

pytestmark = [pytest.mark.network, pytest.mark.filterwarnings("ignore::ResourceWarning")]

VIEWER_STACK = ("gradio", "gradio-client", "fastapi", "starlette", "uvicorn", "python-multipart", "pillow",
                "pydicom", "safetensors", "httpx", "pydantic", "numpy", "torch", "jinja2", "orjson",
                "aiofiles", "h11", "anyio", "huggingface-hub", "pylibjpeg", "python-gdcm", "safehttpx")


def _closure(names) -> dict[str, str]:
    """The installed versions of `names` and everything they require (what the venv resolved)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def _pip_audit(pins: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], dict[str, list], str | None]:
    """pip-audit over the pins: (audited {name: version}, advisories {name==version: [(id, fixed in)]},
    why it audited nothing or not everything, or None)."""
    req = tmp_path / "viewer-requirements.txt"
    req.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    exe = Path(sys.executable).with_name("pip-audit")
    cmd = [str(exe) if exe.exists() else "pip-audit", "-r", str(req), "--no-deps", "--disable-pip",
           "--progress-spinner", "off", "-f", "json", "--cache-dir", str(tmp_path / "cache"), "--timeout", "20"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {}, {}, "no advisory service answered within 300 s"
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if re.search(r"connect|resolve|network|timed? ?out|HTTPS?Connection|Max retries", proc.stderr, re.I):
            return {}, {}, f"could not reach its advisory service: {last}"
        pytest.fail(f"pip-audit failed (exit {proc.returncode}): {last}")
    deps = report["dependencies"]
    audited = {d["name"]: d["version"] for d in deps if "skip_reason" not in d}
    advisories = {f"{d['name']}=={d['version']}": [(v["id"], v.get("fix_versions")) for v in d["vulns"]]
                  for d in deps if d.get("vulns")}
    skipped = [d["name"] for d in deps if "skip_reason" in d]
    return audited, advisories, (f"{len(skipped)} of {len(deps)} not found on its advisory service "
                                 f"(e.g. {skipped[0]})" if skipped else None)


def _pypi_latest_advisories(pins: dict[str, str]) -> tuple[dict[str, str], dict[str, list], dict[str, tuple]]:
    """PyPI's project JSON (`/pypi/<name>/json`): the `vulnerabilities` of the latest release, from the
    advisory data pip-audit's 'pypi' service reads per version. Exact for an installed version that is
    the latest release; an older one is returned as (installed, latest), not audited.

    Why: the index reachable from this project's machines answers the project endpoint but not the
    per-version one (404), and OSV does not resolve, so pip-audit alone audits nothing here."""
    import httpx

    audited, advisories, older = {}, {}, {}
    with httpx.Client(timeout=20, follow_redirects=True) as client:
        for name, version in sorted(pins.items()):
            try:
                reply = client.get(f"https://pypi.org/pypi/{name}/json")
            except httpx.HTTPError:
                continue
            if reply.status_code != 200:
                continue
            data = reply.json()
            if data["info"]["version"] != version:
                older[name] = (version, data["info"]["version"])
                continue
            audited[name] = version
            found = [(v["id"], v.get("fixed_in")) for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")]
            if found:
                advisories[f"{name}=={version}"] = found
    return audited, advisories, older


def test_pip_audit_finds_no_known_advisory_in_the_viewer_stack(tmp_path):
    """pip-audit first; where it cannot look a package up, PyPI's own advisory data for the packages
    installed at their latest release. Packages that are neither are reported, not passed over."""
    pins = _closure(VIEWER_STACK)
    assert {"gradio", "fastapi", "starlette", "uvicorn", "python-multipart"} <= set(pins)
    audited, advisories, why = _pip_audit(pins, tmp_path)
    service, older = "pip-audit", {}
    if why is not None:
        rest = {n: v for n, v in pins.items() if re.sub(r"[-_.]+", "-", n).lower() not in
                {re.sub(r"[-_.]+", "-", a).lower() for a in audited}}
        more, more_advisories, older = _pypi_latest_advisories(rest)
        if not audited and not more:
            pytest.skip(f"pip-audit {why}; PyPI's project JSON did not answer either (offline machine?)")
        audited, advisories = {**audited, **more}, {**advisories, **more_advisories}
        service = f"pip-audit ({why}), then PyPI's project JSON for the latest releases"
    assert advisories == {}, f"known advisories (id, fixed in): {advisories}"
    caveat = None
    if older:
        caveat = (f"{len(older)} of {len(pins)} packages not audited: older than their latest release, whose "
                  f"advisories only a per-version lookup gives (" + ", ".join(
                      f"{n} {v} < {latest}" for n, (v, latest) in sorted(older.items())) + ")")
    record("pip_audit", packages=len(pins), audited=len(audited), not_audited=len(older), advisories=0,
           service=service, **({"caveat": caveat} if caveat else {}))
