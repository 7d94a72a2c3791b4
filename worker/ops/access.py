"""Who may watch the live preview: a token when the server is reachable beyond loopback, and the
WebSocket's ``Origin``.

The preview (``/``, ``/api/...``, ``/preview/...``) shows a plant's cameras, so:

- **Bound to loopback** (``http.host: 127.0.0.1``, the default) and no token configured: only local
  processes reach it. The ``Host`` header must then name a loopback host (``localhost``, ``127.x``,
  ``[::1]``) or an allowed origin's host, which defeats DNS rebinding (a foreign page whose name
  resolves to 127.0.0.1 sends its own name as ``Host``).
- **Bound beyond loopback** (``0.0.0.0``, a LAN address, a hostname), or a token configured: every
  preview request must carry the token, either ``Authorization: Bearer <token>`` (scripts), or once
  ``/?token=<token>`` (a browser), which sets an ``HttpOnly``, ``SameSite=Strict`` cookie holding a
  keyed hash of the token (never the token) and redirects to ``/`` so the token leaves the address
  bar. Comparisons are constant-time (``hmac.compare_digest``). Without a configured token the
  preview then answers 403 (and the worker logs why at start-up).
- **WebSocket**: a browser always sends ``Origin``; it must be the page's own origin (same host and
  port as ``Host``) or one of ``http.allowed_origins``; ``null`` or any other origin is refused
  (403) before the upgrade. A client without ``Origin`` (not a browser) is let through to the token
  check.

``/metrics``, ``/healthz`` and ``/readyz`` stay open for probes and scrapers unless
``http.open_probes: false``, which puts them behind the same token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import hdrs, web

__all__ = ["COOKIE_NAME", "AccessPolicy", "is_loopback_host"]

COOKIE_NAME = "segstream_preview"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    """True for a name or address that only this machine reaches (``127.0.0.0/8``, ``::1``,
    ``localhost``); ``0.0.0.0``, ``::``, ``""`` and every other name or address are not.

    Example:
        >>> [is_loopback_host(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "cam.lan")]
        [True, True, True, False, False]
    """
    name = host.strip().strip("[]").lower().rstrip(".")
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case (default ports dropped), or None if not an origin."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _host_name(host_header: str) -> str:
    """The host of a ``Host`` header value (``[::1]:9108`` → ``::1``, ``a:80`` → ``a``)."""
    parts = urlsplit(f"//{host_header.strip()}")
    return (parts.hostname or "").lower()


@dataclass(frozen=True)
class AccessPolicy:
    """The preview's access rules for one server.

    Args:
        bind_host: the address the server listens on.
        token: the preview token (``http.preview_token_env`` / ``preview_token_file``), or None.
        allowed_origins: extra origins (``https://ops.example.com``) whose pages may open the WebSocket.
        open_probes: ``/metrics``, ``/healthz``, ``/readyz`` answer without a token.
    """

    bind_host: str = "127.0.0.1"
    token: str | None = field(default=None, repr=False)
    allowed_origins: Iterable[str] = ()
    open_probes: bool = True
    _origins: frozenset[str] = field(init=False, repr=False, default=frozenset())
    _cookie: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        origins = set()
        for value in self.allowed_origins:
            origin = _origin(value)
            if origin is None:
                raise ValueError(f"allowed origin {value!r} is not scheme://host[:port]")
            origins.add(origin)
        object.__setattr__(self, "_origins", frozenset(origins))
        if self.token is not None:
            if len(self.token) < 16:
                raise ValueError("the preview token must have at least 16 characters")
            digest = hmac.new(self.token.encode(), b"segstream preview cookie v1", hashlib.sha256)
            object.__setattr__(self, "_cookie", digest.hexdigest())

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.bind_host)

    @property
    def token_required(self) -> bool:
        """A token guards the preview: the server is reachable beyond loopback, or one is configured."""
        return self.token is not None or not self.loopback

    def problem(self) -> str | None:
        """Why the preview cannot be used at all (bound beyond loopback without a token), or None."""
        if self.token is None and not self.loopback:
            return (
                f"the live preview is refused: http.host {self.bind_host!r} is reachable beyond loopback "
                "and no preview token is set (http.preview_token_env / http.preview_token_file)"
            )
        return None

    # -- checks (raise aiohttp HTTP errors) -----------------------------------------------------------

    def check_preview(self, request: web.Request) -> None:
        """Admit a preview request (page, API, snapshot) or raise 401/403."""
        if not self.token_required:
            self._check_local_host(request)
            return
        problem = self.problem()
        if problem is not None:
            raise web.HTTPForbidden(text=problem + "\n")
        if not self._has_token(request):
            raise web.HTTPUnauthorized(
                text="the live preview needs its token: open /?token=<token> once, "
                "or send 'Authorization: Bearer <token>'\n",
                headers={"WWW-Authenticate": 'Bearer realm="segstream preview"'},
            )

    def check_websocket(self, request: web.Request) -> None:
        """Admit a preview WebSocket upgrade: ``Origin`` first, then the preview rules."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self._origin_allowed(origin, request):
            raise web.HTTPForbidden(text=f"origin {origin!r} may not open the preview WebSocket\n")
        self.check_preview(request)

    def check_probe(self, request: web.Request) -> None:
        """``/metrics``, ``/healthz``, ``/readyz``: open unless ``open_probes`` is off."""
        if self.open_probes or not self.token_required:
            return
        if not self._bearer_ok(request):
            raise web.HTTPUnauthorized(
                text="this endpoint needs the token ('Authorization: Bearer <token>')\n",
                headers={"WWW-Authenticate": 'Bearer realm="segstream"'},
            )

    def login(self, request: web.Request) -> web.Response | None:
        """``/?token=...``: a redirect to ``/`` that sets the cookie, or 401 for a wrong token; None when
        the request carries no ``token`` query or no token is required."""
        given = request.query.get("token")
        if given is None or not self.token_required:
            return None
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise web.HTTPUnauthorized(text="wrong preview token\n")
        response = web.Response(status=303, headers={hdrs.LOCATION: request.rel_url.path})
        response.set_cookie(
            COOKIE_NAME, self._cookie, httponly=True, samesite="Strict", secure=request.secure, path="/"
        )
        return response

    # -- helpers -------------------------------------------------------------------------------------

    def _has_token(self, request: web.Request) -> bool:
        if self._bearer_ok(request):
            return True
        cookie = request.cookies.get(COOKIE_NAME)
        return cookie is not None and bool(self._cookie) and hmac.compare_digest(cookie, self._cookie)

    def _bearer_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return False
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _origin_allowed(self, origin: str, request: web.Request) -> bool:
        normalized = _origin(origin)
        if normalized is None:  # "null" (sandboxed frames, file://) or garbage
            return False
        if normalized in self._origins:
            return True
        own = _origin(f"{request.scheme}://{request.host}")
        if own is not None and normalized == own:
            return True
        # behind a TLS proxy the request's scheme is http while the page's is https: same host:port
        return urlsplit(normalized).netloc == urlsplit(own or "").netloc

    def _check_local_host(self, request: web.Request) -> None:
        host = _host_name(request.host)
        allowed = {urlsplit(o).hostname for o in self._origins}
        if not (is_loopback_host(host) or host in allowed):
            raise web.HTTPForbidden(
                text=f"host {host!r} is not a loopback name; this preview is for this machine only\n"
            )
