"""Viewer roles (pipeline/viewer/auth.py): viewer by default, reviewer from the users file or
$CXR_REVIEWERS; a users file written before roles existed keeps working, everyone in it a viewer."""
from __future__ import annotations

import io
import json
import os

import pytest

from pipeline.viewer import auth
from pipeline.viewer.auth import REVIEWER, VIEWER, Users, add_user, hash_password, set_role


def test_a_users_file_without_roles_keeps_working_and_everyone_is_a_viewer(tmp_path, monkeypatch):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": {"nurse": hash_password("nurse-password-1")}}))   # the old format
    monkeypatch.delenv("CXR_USERS", raising=False)
    monkeypatch.delenv("CXR_REVIEWERS", raising=False)
    users = Users.load(path)
    assert users.check("nurse", "nurse-password-1") and users.role("nurse") == VIEWER
    assert users.role("stranger") is None and users.role(None) is None and users.role("") is None


def test_add_and_role_set_a_reviewer_and_keep_the_role_when_the_password_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_REVIEWERS", raising=False)
    path = tmp_path / ".cxr" / "users.json"
    add_user(path, "ann", "ann-password-1", role=REVIEWER)
    add_user(path, "bob", "bob-password-1")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    users = Users.load(path)
    assert users.role("ann") == REVIEWER and users.role("bob") == VIEWER
    add_user(path, "ann", "ann-password-2")                 # a new password: the role stays
    set_role(path, "bob", REVIEWER)
    users = Users.load(path)
    assert users.check("ann", "ann-password-2") and users.role("ann") == REVIEWER and users.role("bob") == REVIEWER
    set_role(path, "ann", VIEWER)
    assert Users.load(path).role("ann") == VIEWER
    with pytest.raises(ValueError, match="a role is one of"):
        set_role(path, "bob", "admin")
    with pytest.raises(ValueError, match="no user"):
        set_role(path, "carol", REVIEWER)
    stored = json.loads(path.read_text())
    assert set(stored) == {"users", "roles"} and stored["roles"] == {"bob": REVIEWER}


def test_an_unknown_role_in_the_file_counts_as_viewer(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": {"x": hash_password("x-password-1")}, "roles": {"x": "admin"}}))
    assert Users.load(path).role("x") == VIEWER


def test_demo_users_named_in_cxr_reviewers_are_reviewers(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_USERS", "ann:pw-ann-123,bob:pw-bob-123")
    monkeypatch.setenv("CXR_REVIEWERS", " ann , ghost ")
    users = Users.load(tmp_path / "none.json")
    assert users.role("ann") == REVIEWER and users.role("bob") == VIEWER
    assert users.role("ghost") is None   # naming someone a reviewer does not make them a user


def test_the_users_command_sets_roles(tmp_path, monkeypatch):
    path = tmp_path / "users.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-pw\n"))
    auth.main(["add", "ann", "--file", str(path), "--password-stdin", "--role", "reviewer"])
    monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-pw\n"))
    auth.main(["add", "bob", "--file", str(path), "--password-stdin"])
    monkeypatch.delenv("CXR_REVIEWERS", raising=False)
    assert Users.load(path).role("ann") == REVIEWER and Users.load(path).role("bob") == VIEWER
    auth.main(["role", "bob", "reviewer", "--file", str(path)])
    assert Users.load(path).role("bob") == REVIEWER
    with pytest.raises(SystemExit, match="no user"):
        auth.main(["role", "carol", "viewer", "--file", str(path)])
    with pytest.raises(SystemExit):
        auth.main(["role", "bob", "admin", "--file", str(path)])   # argparse: not a choice
    assert os.stat(path).st_mode & 0o777 == 0o600
