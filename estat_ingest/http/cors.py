"""CORS for /collect (DESIGN.md §3; v1 defect §9 m: v1 sent no CORS headers at all).

CORS_ALLOW_ORIGINS is a list of exact origins (`https://shop.example`) or `*`.
- Exact origins: an allowed `Origin` is echoed with `Access-Control-Allow-Credentials: true` and
  `Vary: Origin`, so `fetch(..., {credentials: "include"})` works from those sites.
- `*`: any origin may send and read the answer, but without credentials — a wildcard that also
  allowed credentials would let every site on the web make logged-in requests.
- Not allowed, or CORS not configured: no CORS headers; the browser blocks the answer.
Preflights (`OPTIONS` with `Access-Control-Request-Method`) answer 204 either way; only an
allowed origin gets the Allow-* headers. Header dicts are built once per origin and reused.
"""

from __future__ import annotations

from collections.abc import Mapping

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Content-Encoding, Authorization, X-Api-Key, X-Requested-With"
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate"
MAX_AGE = "7200"  # Chromium caps preflight caching at 2 h; Firefox at 24 h
MAX_ORIGIN = 256


class Cors:
    def __init__(self, allow_origins: tuple[str, ...]) -> None:
        self.enabled = bool(allow_origins)
        self.any = "*" in allow_origins
        self.origins = frozenset(o.rstrip("/") for o in allow_origins if o != "*")
        self._simple: dict[str, Mapping[str, str]] = {}
        self._preflight: dict[str, Mapping[str, str]] = {}
        if self.any:
            self._any_simple = {"Access-Control-Allow-Origin": "*",
                                "Access-Control-Expose-Headers": EXPOSE_HEADERS}
            self._any_preflight = {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": MAX_AGE,
            }
        for o in self.origins:
            self._simple[o] = {
                "Access-Control-Allow-Origin": o,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": EXPOSE_HEADERS,
                "Vary": "Origin",
            }
            self._preflight[o] = {
                "Access-Control-Allow-Origin": o,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": MAX_AGE,
                "Vary": "Origin",
            }

    def simple(self, origin: str | None) -> Mapping[str, str] | None:
        """Headers for an actual (non-preflight) response, or None."""
        if not origin or not self.enabled:
            return None
        h = self._simple.get(origin)
        if h is not None:
            return h
        return self._any_simple if self.any else None

    def preflight(self, origin: str | None) -> Mapping[str, str] | None:
        if not origin or not self.enabled:
            return None
        h = self._preflight.get(origin)
        if h is not None:
            return h
        return self._any_preflight if self.any else None
