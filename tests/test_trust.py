"""core/trust.py: what a workflow may name (folders inside the owner's roots, servers on loopback or listed).

Real folders and links on disk; URLs checked as written (nothing here opens a connection: a refused URL would
fail these tests the same way with the network unplugged)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl_fast.core import trust
from qwenvl_fast.core.trust import (
    FOLDER_ROOTS_ENV,
    SERVER_ORIGINS_ENV,
    TrustError,
    check_folder,
    check_server_url,
    env_folder_roots,
    env_server_origins,
    is_loopback_host,
    normalized_origin,
)


# ------------------------------------------------------------------------------------------------- folders
def test_a_folder_inside_a_root_is_allowed_resolved(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    assert check_folder(root / "a" / "b", [root]) == (root / "a" / "b").resolve()
    assert check_folder(root, [root]) == root.resolve()
    assert check_folder(str(root / "a" / ".." / "a"), [root]) == (root / "a").resolve()


def test_a_folder_outside_every_root_is_refused_naming_the_variable(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "pictures"
    root.mkdir()
    outside.mkdir()
    with pytest.raises(TrustError, match=FOLDER_ROOTS_ENV) as caught:
        check_folder(outside, [root])
    assert str(outside) in str(caught.value)
    with pytest.raises(TrustError, match=FOLDER_ROOTS_ENV):
        check_folder(root / ".." / "pictures", [root])  # dot-dot out of the root
    with pytest.raises(TrustError, match=FOLDER_ROOTS_ENV):
        check_folder(tmp_path / "root-sibling", [root])  # a common prefix is not containment
    with pytest.raises(TrustError, match=FOLDER_ROOTS_ENV):
        check_folder(root, [])


def test_a_link_inside_a_root_that_leads_outside_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "home-pictures"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TrustError, match="leads to") as caught:
        check_folder(root / "escape", [root])
    assert FOLDER_ROOTS_ENV in str(caught.value)
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner", target_is_directory=True)
    assert check_folder(root / "alias", [root]) == (root / "inner").resolve()  # a link that stays inside


def test_a_root_that_is_itself_a_link_counts_as_its_target(tmp_path):
    real = tmp_path / "real"
    (real / "set").mkdir(parents=True)
    (tmp_path / "linked-root").symlink_to(real, target_is_directory=True)
    assert check_folder(real / "set", [tmp_path / "linked-root"]) == (real / "set").resolve()


def test_relative_and_nul_paths_are_refused(tmp_path):
    with pytest.raises(TrustError, match="not a full path"):
        check_folder("pictures", [tmp_path])
    with pytest.raises(TrustError, match="NUL"):
        check_folder(str(tmp_path) + "/a\x00b", [tmp_path])


def test_env_folder_roots_reads_the_pathsep_list(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    env = {FOLDER_ROOTS_ENV: f"{a}{os.pathsep} {os.pathsep}relative{os.pathsep}{b} "}
    assert env_folder_roots(env) == [a, b]
    assert env_folder_roots({}) == []


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.sampled_from(["a", "b", "..", ".", "escape", "inside"]), min_size=1, max_size=6))
def test_property_whatever_the_path_the_result_lies_inside_the_root(tmp_path_factory, parts):
    base = tmp_path_factory.mktemp("prop")
    root = base / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "inside").symlink_to(root / "a", target_is_directory=True)
    (root / "escape").symlink_to(base, target_is_directory=True)
    try:
        result = check_folder(root.joinpath(*parts), [root])
    except TrustError as exc:
        assert FOLDER_ROOTS_ENV in str(exc)
        target = Path(os.path.realpath(root.joinpath(*parts)))
        assert not target.is_relative_to(root.resolve())
    else:
        assert result.is_relative_to(root.resolve())


# ------------------------------------------------------------------------------------------------- servers
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://LOCALHOST/v1", "http://[::1]:8080/v1",
    "https://127.5.6.7/v1", "127.0.0.1:8000/v1", "http://127.255.255.254:1/",
])
def test_loopback_urls_are_allowed_as_written(url):
    assert check_server_url(url, []) == url


@pytest.mark.parametrize("url", [
    "http://192.168.1.10:8000/v1", "https://api.example.com/v1", "http://127.1:8000/v1",
    "http://2130706433:8000/v1", "http://0x7f000001/v1", "http://localhost.example.com/v1",
    "http://[::ffff:127.0.0.1]/v1", "http://0.0.0.0:8000/v1", "http://128.0.0.1/v1", "example.org:8000/v1",
])
def test_other_hosts_are_refused_naming_the_variable_and_the_origin(url):
    with pytest.raises(TrustError, match=SERVER_ORIGINS_ENV) as caught:
        check_server_url(url, [])
    assert normalized_origin(url) in str(caught.value)


def test_listed_origins_are_allowed_exactly(monkeypatch):
    listed = ["https://api.example.com", "http://2130706433:8000", "HTTP://Gpu-Box:9000/ignored-path"]
    assert check_server_url("https://api.example.com/v1", listed)
    assert check_server_url("https://api.example.com:443/v1", listed)
    assert check_server_url("http://2130706433:8000/v1", listed)
    assert check_server_url("http://gpu-box:9000/v1", listed)
    for other in ("http://api.example.com/v1", "https://api.example.com:8443/v1", "http://2130706433:8001/v1",
                  "https://evil.api.example.com/v1", "http://gpu-box/v1"):
        with pytest.raises(TrustError, match=SERVER_ORIGINS_ENV):
            check_server_url(other, listed)
    monkeypatch.setenv(SERVER_ORIGINS_ENV, " https://api.example.com , not an origin,,http://10.0.0.5:8000 ")
    assert env_server_origins() == {"https://api.example.com", "http://10.0.0.5:8000"}


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1:8000/v1", "ftp://127.0.0.1/v1", "http://:80/v1",
                                 "http://127.0.0.1:99999/v1", "file:///etc/passwd"])
def test_urls_whose_host_cannot_be_read_are_refused(url):
    with pytest.raises(TrustError):
        check_server_url(url, ["http://127.0.0.1:8000"])


def test_the_check_makes_no_name_lookup(monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError(f"name lookup during the check: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(socket, "gethostbyname", no_lookup)
    with pytest.raises(TrustError):
        check_server_url("http://some-host.invalid:8000/v1", [])
    assert check_server_url("http://some-host.invalid:8000/v1", ["http://some-host.invalid:8000"])


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
                      st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True)),
       port=st.integers(1, 65535))
def test_property_allowed_without_a_list_only_when_loopback_as_written(host, port):
    url = f"http://{host}:{port}/v1"
    try:
        check_server_url(url, [])
    except TrustError:
        assert not is_loopback_host(host.strip("[]"))
    else:
        assert is_loopback_host(host.strip("[]")), url
        bare = host.strip("[]")
        assert bare == "localhost" or bare == "::1" or bare.startswith("127.")


def test_errors_do_not_echo_control_characters():
    with pytest.raises(TrustError) as caught:
        check_server_url("http://evil.example/v1\n\x1b[31m" + "x" * 5000, [])
    text = str(caught.value)
    assert "\x1b" not in text and "\n" not in text and len(text) < 1200
    assert trust._shown("a\nb") == "a?b"


# ------------------------------------------------------------------------------------- what a server says
def test_a_servers_error_body_is_quoted_short_and_on_one_line():
    """A workflow may point server_url at a local service: its answer must not come back whole in the error."""
    from qwenvl_fast.backends.errors import MAX_SERVER_TEXT
    from qwenvl_fast.backends.faults import Faults
    from qwenvl_fast.backends.http_transport import Endpoint

    secret = "root:x:0:0:root:/root:/bin/bash\n\x1b[2J" + "SECRET-" * 500
    for body in (secret.encode(), b'{"error": {"message": "' + secret.encode("unicode_escape") + b'"}}'):
        err = Faults(Endpoint.parse("http://127.0.0.1:9/v1")).status(500, None, body, "/chat/completions")
        text = str(err)
        assert "\n" not in text and "\x1b" not in text
        assert text.count("SECRET-") * len("SECRET-") <= MAX_SERVER_TEXT <= 200
