"""What a workflow may name: folders inside the owner's roots, servers on loopback or at the owner's origins.

A ComfyUI workflow is untrusted input (it travels inside PNGs, from strangers); the machine's environment is
the owner's. These checks are pure (no ComfyUI, no network, no file opened): the ComfyUI glue
(``comfyui_host/trust.py``) supplies ComfyUI's own folders as the default roots and applies them where a
workflow's folder or ``server_url`` enters. The command line is the owner typing and is not restricted.

* :func:`check_folder`: the path is resolved (links followed) *before* the check, so a link inside an allowed
  root that leads outside is refused. ``$QWENVL_FAST_FOLDER_ROOTS`` (``os.pathsep``-separated) adds roots.
* :func:`check_server_url`: the host *as written* must be loopback (``localhost``, ``127.0.0.0/8``,
  ``[::1]``) or the URL's origin must be listed in ``$QWENVL_FAST_SERVER_ORIGINS`` (comma-separated
  ``scheme://host[:port]``). No name lookup, no connection: a name that resolves to loopback is still refused
  unless listed, so nothing a workflow writes makes the pack reach a host the owner did not name.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from .errors import QwenVLError

FOLDER_ROOTS_ENV = "QWENVL_FAST_FOLDER_ROOTS"
SERVER_ORIGINS_ENV = "QWENVL_FAST_SERVER_ORIGINS"
LOOPBACK_NAMES = ("localhost",)
_SHOWN = 200  # characters of a workflow's own value quoted in an error


class TrustError(QwenVLError):
    """A workflow named a folder or server that the machine's owner has not allowed."""


def _shown(text: str) -> str:
    """A workflow's value, bounded and on one line, for an error message."""
    flat = "".join(c if c.isprintable() else "?" for c in str(text))
    return flat if len(flat) <= _SHOWN else flat[:_SHOWN] + " …"


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def env_folder_roots(environ: dict[str, str] | None = None) -> list[Path]:
    """The roots the owner listed in ``$QWENVL_FAST_FOLDER_ROOTS``; relative or empty entries are ignored
    (a relative root would depend on ComfyUI's working directory)."""
    raw = (os.environ if environ is None else environ).get(FOLDER_ROOTS_ENV, "")
    roots = []
    for entry in raw.split(os.pathsep):
        entry = entry.strip()
        if entry and Path(entry).expanduser().is_absolute():
            roots.append(Path(entry).expanduser())
    return roots


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_folder(path: str | os.PathLike[str], allowed_roots: Iterable[str | os.PathLike[str]]) -> Path:
    """``path`` resolved (links followed), if it lies inside one of ``allowed_roots`` (also resolved); else a
    :class:`TrustError` naming ``$QWENVL_FAST_FOLDER_ROOTS``. Nothing is read: a missing folder passes the check
    when its resolved path is inside a root (the caller reports it missing)."""
    text = str(path)
    if "\x00" in text:
        raise TrustError(f"The folder '{_shown(text)}' holds a NUL character: give a plain path.")
    given = Path(text).expanduser()
    if not given.is_absolute():
        raise TrustError(f"The folder '{_shown(text)}' is not a full path: give the full path of a folder inside "
                         f"ComfyUI's input, output or user folder, or inside a root listed in ${FOLDER_ROOTS_ENV}.")
    target = _resolved(given)
    roots = [_resolved(Path(r).expanduser()) for r in allowed_roots]
    for root in roots:
        if target == root or target.is_relative_to(root):
            return target
    via = f" (it leads to '{_shown(str(target))}')" if target != given else ""
    listed = ", ".join(_shown(str(r)) for r in roots) or "none"
    raise TrustError(f"The folder '{_shown(text)}'{via} is outside the folders a workflow may use ({listed}). A "
                     f"shared workflow must not read or write your other folders: if you trust this one, add it to "
                     f"${FOLDER_ROOTS_ENV} (separated by '{os.pathsep}') in ComfyUI's environment and restart "
                     "ComfyUI.")


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def normalized_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of ``url`` as written (lowercase, default port left out; no scheme means
    http, as the server backend reads it), or None where it is not an http(s) URL without credentials."""
    text = str(url or "").strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    if port is not None and not 1 <= port <= 65535:
        return None
    origin = f"{scheme}://{_host_text(parts.hostname.lower())}"
    return origin if port in (None, 443 if scheme == "https" else 80) else f"{origin}:{port}"


def env_server_origins(environ: dict[str, str] | None = None) -> set[str]:
    """The origins the owner listed in ``$QWENVL_FAST_SERVER_ORIGINS`` (malformed entries are ignored)."""
    raw = (os.environ if environ is None else environ).get(SERVER_ORIGINS_ENV, "")
    entries = (e.strip() for e in raw.split(","))
    origins = (normalized_origin(e) for e in entries if "://" in e and not any(c.isspace() for c in e))
    return {o for o in origins if o is not None}


def is_loopback_host(host: str) -> bool:
    """``localhost``, an address in ``127.0.0.0/8`` or ``::1``, *as written*: no name lookup, and no other
    spelling of an address (``127.1``, ``2130706433``) counts."""
    host = host.lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.IPv4Network("127.0.0.0/8")
    return address == ipaddress.IPv6Address("::1")


def check_server_url(url: str, allowed_origins: Iterable[str]) -> str:
    """``url`` unchanged when its host as written is loopback or its origin is one of ``allowed_origins``
    (normalized like :func:`normalized_origin`); else a :class:`TrustError` naming
    ``$QWENVL_FAST_SERVER_ORIGINS``. Malformed URLs pass through to the server backend's own clear errors only
    when they could not reach anything; one with a host that is not allowed is refused here."""
    origin = normalized_origin(url)
    if origin is None:
        # Not an http(s) URL (the backend says so, before any connection); but a URL that carries credentials
        # or an odd scheme must not slip past: refuse anything whose host we cannot read.
        raise TrustError(f"server_url '{_shown(url)}' is not an http(s) URL like http://127.0.0.1:8000/v1 (no "
                         "credentials in it: the API key goes in $QWENVL_FAST_API_KEY).")
    host = urllib.parse.urlsplit(origin).hostname or ""
    if is_loopback_host(host):
        return url
    allowed = {o for o in (normalized_origin(a) for a in allowed_origins) if o is not None}
    if origin in allowed:
        return url
    raise TrustError(f"server_url '{_shown(url)}' names {origin}, which is not on this machine (loopback: "
                     "localhost, 127.0.0.0/8, [::1]) and not a server you listed. A shared workflow must not send "
                     f"your pictures to a server of its choosing: if you trust this one, add {origin} to "
                     f"${SERVER_ORIGINS_ENV} (comma-separated scheme://host[:port]) in ComfyUI's environment and "
                     "restart ComfyUI.")
