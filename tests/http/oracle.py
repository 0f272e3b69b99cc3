"""The framing oracle of tests/http/test_framing_fuzz.py: h11 (python-hyper, a pure-Python HTTP/1.1
parser written from the RFCs, sharing no code with llhttp, which both fronts use) frames a byte
stream into requests, and estat-ingest's policy says what the server must do with each one.

`frame(stream)` runs h11 one request at a time (a fresh `h11.Connection` per request, fed the bytes
the previous one left), so the server's own choices decide what follows a request, not h11's: h11
keeps no HTTP/1.0 keep-alive and parks after an Upgrade request, while an ingest server answers an
Upgrade like any request (issue 15) and may keep an HTTP/1.0 connection that asked for it.

Where the server and h11 legitimately differ, the difference is written below as a named policy,
never as a blanket ignore:
- `REFUSE` (the server is stricter than h11, on purpose; the front must answer 4xx, close, and
  store nothing from that request on): duplicate framing-relevant headers (RFC 9112 §3.2 for Host;
  issue 15 for the rest — h11 merges identical Content-Length lines and keeps every Content-Type
  line), Content-Length together with Transfer-Encoding (RFC 9112 §6.1 "ought to be handled as an
  error"; docs/security.md), a POST /collect body over MAX_BODY_SIZE (413), a CONNECT request with
  Content-Length or Transfer-Encoding (RFC 9110 §9.3.6 says CONNECT has no content, RFC 9112 §6.3
  frames it by those headers: a server and a proxy can read its bytes differently, so the only safe
  answer is a refusal; a CONNECT without them is a plain request like an Upgrade one);
- `MAY_REFUSE` (the front may refuse — 4xx or close — where h11 accepts; if it accepts, it must
  frame exactly as h11 does): the reasons in `MAY_REFUSE`, each an RFC "MAY" or a leniency of h11;
- what is stored is the server's contract (DESIGN.md §3): POST/GET on /collect and the pixel paths;
  GET stores the raw query, POST the (decoded) body if it is UTF-8 JSON; everything else is
  answered and stores nothing (405, 404, OPTIONS, 415, 400 invalid JSON) and the connection goes on.
"""

from __future__ import annotations

import gzip
import itertools
import re
import zlib
from dataclasses import dataclass, field
from enum import Enum

import h11
import orjson

from tests.http.rawhttp import Answer

COLLECT_PATHS = frozenset({"/collect", "/collect.gif", "/pixel.gif"})
# headers whose second line changes how the server frames or reads the request: refused (issue 15)
FRAMING_HEADERS = ("host", "content-length", "transfer-encoding", "content-type", "content-encoding")
# not lists (RFC 9110 §5.3), outside FRAMING_HEADERS: a second line may be refused
SINGLETON_HEADERS = ("user-agent", "authorization", "content-location", "content-range", "etag", "max-forwards",
                     "server", "referer", "from")
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")

MAY_REFUSE = {
    "bare_lf": "a line ended by LF alone (RFC 9112 §2.2: a recipient MAY accept it; llhttp strict does not)",
    "obs_fold": "obsolete line folding (RFC 9112 §5.2: a server MUST reject it with 400 or unfold it)",
    "empty_line_before_request": "an empty line (CRLF, or LF) before a request line (RFC 9112 §2.2: SHOULD "
                                 "ignore; h11 refuses, so the oracle skips it itself)",
    "duplicate_singleton_header": "a second line of a header that is not a list, e.g. User-Agent (RFC 9110 "
                                  "§5.3: a sender MUST NOT send it; aiohttp's parser refuses it)",
    "chunk_size_whitespace": "whitespace after a chunk size without an extension (not in RFC 9112 §7.1's "
                             "grammar; h11 tolerates it)",
    "body_over_limit_unused": "a body over MAX_BODY_SIZE that the server does not use (not a POST to /collect):"
                              " the fast front answers 413, the aiohttp front reads and drops it",
    "transfer_encoding_htab": "an HTAB in the whitespace of a Transfer-Encoding line (valid OWS, RFC 9110 §5.6.3, "
                              "but a classic obfuscation of that header: llhttp refuses a trailing one, and "
                              "docs/security.md refuses obfuscated Transfer-Encoding)",
}


# the reason of a refusal the head does not show: a chunked body that turns out over MAX_BODY_SIZE
UNANNOUNCED_TOO_LARGE = "too_large_chunked"


class Kind(Enum):
    STORE = "store"  # answered 2xx and stored: `events`
    ANSWER = "answer"  # answered, nothing stored, the connection goes on
    REFUSE = "refuse"  # 4xx and close: nothing from this request on is stored


@dataclass(frozen=True)
class Judged:
    """One request as h11 framed it, and what the server must do with it."""

    raw: bytes  # the exact bytes of the request (leading empty lines included)
    method: str
    target: str
    version: str  # "1.0" / "1.1"
    head_names: tuple[str, ...]  # header names in the raw head, lower-cased, one per line
    body: bytes  # the message body (chunked framing removed)
    kind: Kind
    reason: str
    events: tuple[str, ...] = ()
    may_refuse: tuple[str, ...] = ()  # MAY_REFUSE keys that apply
    closes: bool = False  # the connection ends after it (RFC 9112 §9.3, §6.1)

    def summary(self) -> str:
        extra = f" may_refuse={list(self.may_refuse)}" if self.may_refuse else ""
        return (f"{self.method} {self.target} HTTP/{self.version} -> {self.kind.value}({self.reason})"
                f"{' +close' if self.closes else ''}{extra}")


@dataclass(frozen=True)
class Oracle:
    requests: tuple[Judged, ...]
    end: str  # "open" | "closed" (a request ended it) | "refused" | "incomplete" | "error"
    error: str = ""  # h11's message when end == "error"
    rest: bytes = b""  # bytes after the last framed request
    # end == "incomplete" or "error" after a complete head (its body has not all come, or is
    # malformed): that head, judged; a `100 Continue` may be its due (RFC 9110 §10.1.1: the client may
    # be waiting for it to send the body, and a malformed body is found only by reading it)
    pending: Judged | None = None

    @property
    def answers_owed(self) -> int:
        """Final answers the server owes: every framed request, plus the 400 to a malformed one."""
        return len(self.requests) + (self.end == "error")

    def summary(self) -> str:
        lines = [f"  [{i}] {j.summary()}" for i, j in enumerate(self.requests)]
        tail = f"end={self.end}" + (f" ({self.error})" if self.error else "")
        if self.pending is not None:
            tail += f", its head: {self.pending.summary()}"
        if self.rest:
            tail += f", then {len(self.rest)} unframed bytes {self.rest[:60]!r}"
        return "\n".join([*lines, "  " + tail])


@dataclass
class _Head:
    names: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # raw, as sent (h11 normalizes some)
    bare_lf: bool = False
    obs_fold: bool = False


def _scan_head(head: bytes) -> _Head:
    """Header names line by line, independently of h11 (which merges some duplicates)."""
    out = _Head(bare_lf=re.search(rb"(?<!\r)\n", head) is not None)
    for line in re.split(rb"\r?\n", head)[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            out.obs_fold = True
            continue
        name, _, value = line.partition(b":")
        out.names.append(name.strip().decode("latin-1").lower())
        out.values.append(value.decode("latin-1"))
    return out


_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)([^\r\n]*)\r?\n")


def _chunk_lines(raw_body: bytes) -> list[bytes]:
    """The chunk-size lines of a chunked body h11 accepted (size + extension part, no CRLF)."""
    out = []
    pos = 0
    while pos < len(raw_body):
        m = _CHUNK_LINE.match(raw_body, pos)
        if m is None:
            break
        out.append(m.group(0).rstrip(b"\r\n"))
        size = int(m.group(1), 16)
        if size == 0:
            break
        pos = m.end() + size
        pos += 2 if raw_body[pos:pos + 2] == b"\r\n" else 1
    return out


def _split_target(target: str) -> tuple[str | None, str]:
    """(path, query) of an origin-form or absolute-form target; no path for `*` and authority form."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    if not target.startswith("/"):
        return None, ""
    path, _, query = target.partition("?")
    return path.split("#", 1)[0], query.split("#", 1)[0]


def _decode(encoding: str | None, body: bytes) -> bytes | None:
    """The body as /collect decodes it (http/bodies.py); None when the server refuses it."""
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error):
        return None
    return None  # 415: an encoding the fuzzer does not decode is never expected to be stored


def judge(raw: bytes, leading: int, req: h11.Request, body: bytes, max_body: int) -> Judged:
    method = req.method.decode("ascii")
    target = req.target.decode("latin-1")
    version = req.http_version.decode("ascii")
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in req.headers.raw_items()]
    hmap: dict[str, list[str]] = {}
    for k, v in headers:
        hmap.setdefault(k, []).append(v)
    head_end = raw.find(b"\r\n\r\n", leading)
    lf_end = raw.find(b"\n\n", leading)
    ends = [e + n for e, n in ((head_end, 4), (lf_end, 2)) if e >= 0]
    cut = min(ends) if ends else len(raw)
    head = raw[leading:cut]
    scan = _scan_head(head)
    may: list[str] = []
    if leading:
        may.append("empty_line_before_request")
    if scan.bare_lf or re.search(rb"(?<!\r)\n", raw[:leading]):
        may.append("bare_lf")
    if scan.obs_fold:
        may.append("obs_fold")
    if any(scan.names.count(n) > 1 for n in SINGLETON_HEADERS):
        may.append("duplicate_singleton_header")
    if any(n == "transfer-encoding" and "\t" in v for n, v in zip(scan.names, scan.values, strict=True)):
        may.append("transfer_encoding_htab")
    te = hmap.get("transfer-encoding")
    if te and any(re.match(rb"[0-9A-Fa-f]+[ \t]+$", line) for line in _chunk_lines(raw[cut:])):
        may.append("chunk_size_whitespace")
    conn_opts = {t.strip().lower() for v in hmap.get("connection", []) for t in v.split(",")}
    closes = "close" in conn_opts or (version == "1.0" and "keep-alive" not in conn_opts) or (
        version == "1.0" and te is not None)  # RFC 9112 §6.1: close after an HTTP/1.0 message with TE

    def verdict(kind: Kind, reason: str, events: tuple[str, ...] = ()) -> Judged:
        return Judged(raw, method, target, version, tuple(scan.names), body, kind, reason, events,
                      tuple(may), closes)

    dups = [n for n in FRAMING_HEADERS if scan.names.count(n) > 1]
    if any("," in v for n, v in zip(scan.names, scan.values, strict=True) if n == "content-length"):
        dups.append("content-length")  # `Content-Length: 5, 5` is the list form of two lines (h11 merges it)
    if dups:
        return verdict(Kind.REFUSE, "duplicate_" + dups[0])
    if te is not None and "content-length" in hmap:
        return verdict(Kind.REFUSE, "content_length_with_transfer_encoding")
    if method == "CONNECT" and (te is not None or "content-length" in hmap):
        return verdict(Kind.REFUSE, "connect_with_body")
    path, query = _split_target(target)
    collect = path in COLLECT_PATHS
    announced = int(hmap["content-length"][0]) if "content-length" in hmap else 0
    if max(announced, len(body)) > max_body:
        if collect and method == "POST":  # chunked: known only once the body has come (a 100 may precede)
            return verdict(Kind.REFUSE, "too_large" if announced > max_body else UNANNOUNCED_TOO_LARGE)
        may.append("body_over_limit_unused")
    if not collect:
        return verdict(Kind.ANSWER, "not_collect")
    if method == "GET":
        try:
            return verdict(Kind.STORE, "get", (query.encode("latin-1").decode("utf-8"),))
        except UnicodeDecodeError:
            return verdict(Kind.ANSWER, "invalid_utf8")
    if method != "POST":
        return verdict(Kind.ANSWER, "options" if method == "OPTIONS" else "method_not_allowed")
    decoded = _decode(hmap.get("content-encoding", [None])[0], body)
    if decoded is None or len(decoded) > max_body:
        return verdict(Kind.ANSWER, "content_encoding")
    ctype = hmap.get("content-type", [""])[0].split(";", 1)[0].strip().lower()
    docs = [ln for ln in decoded.split(b"\n") if ln.strip()] if ctype in NDJSON_TYPES else [decoded]
    if not docs or any(not d.strip() for d in docs):
        return verdict(Kind.ANSWER, "empty")
    try:
        for d in docs:
            orjson.loads(d)
        events = tuple(d.decode("utf-8") for d in docs)
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return verdict(Kind.ANSWER, "invalid_json")
    return verdict(Kind.STORE, "post", events)


def frame(stream: bytes, max_body: int) -> Oracle:
    """h11's framing of `stream` (the bytes a client sent on one connection), judged request by request."""
    out: list[Judged] = []
    rest = stream
    while True:
        if not rest:
            return Oracle(tuple(out), "open")
        empty = _EMPTY_LINES.match(rest)
        leading = empty.end() if empty else 0
        if leading == len(rest):
            return Oracle(tuple(out), "open", rest=rest)
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(rest[leading:])
        body = bytearray()
        req: h11.Request | None = None
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    pending = None if req is None else judge(rest, leading, req, bytes(body), max_body)
                    return Oracle(tuple(out), "incomplete", rest=rest, pending=pending)
                if isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError as err:  # in the body, after a good head: that head, judged
            pending = None if req is None else judge(rest, leading, req, bytes(body), max_body)
            return Oracle(tuple(out), "error", str(err), rest, pending=pending)
        assert req is not None
        left = conn.trailing_data[0]
        raw = rest[:len(rest) - len(left)]
        j = judge(raw, leading, req, bytes(body), max_body)
        out.append(j)
        if j.kind is Kind.REFUSE:
            return Oracle(tuple(out), "refused", rest=left)
        if j.closes:
            return Oracle(tuple(out), "closed", rest=left)
        rest = left


# ---------------------------------------------------------------- what the front did, checked

@dataclass(frozen=True)
class Seen:
    """What one connection to the front showed."""

    answers: tuple[Answer, ...]  # every answer before the probe, 1xx included
    closed_early: bool  # the server closed before the client half-closed (waited for when it must)
    probe: str  # "not_sent" | "answered" | "unanswered": a GET /health sent after the owed answers
    stored: tuple[str, ...]  # the bodies stored from this connection, in receive order


def violations(o: Oracle, seen: Seen) -> list[tuple[str, str]]:
    """(kind, message) for every way the front differs from the oracle and the policy."""
    out: list[tuple[str, str]] = []
    finals = [a for a in seen.answers if not a.interim]
    reqs = o.requests
    errors = [a for a in seen.answers if a.status >= 500 and a.status != 501]
    if errors:  # invariant 5: a bad request gets a 4xx (501 only for a coding it does not know)
        out.append(("server_error", "a 5xx answer: " + "; ".join(str(a) for a in errors)))

    # what was stored: a prefix of the oracle's events, cut only where the policy or the front's own
    # announced close allows
    terminal = len(reqs) - 1 if o.end == "refused" else len(reqs)
    per_req = [j.events if j.kind is Kind.STORE else () for j in reqs[:terminal]]
    cuts = {i for i, j in enumerate(reqs[:terminal]) if j.may_refuse}
    cuts |= {k + 1 for k, a in enumerate(finals) if a.announces_close and k + 1 <= terminal}
    cuts.add(terminal)
    allowed = {tuple(itertools.chain.from_iterable(per_req[:c])) for c in cuts}
    stored = tuple(seen.stored)
    if stored not in allowed:
        full = tuple(itertools.chain.from_iterable(per_req))
        extra = [e for e in stored if e not in full]
        if extra:
            out.append(("stored_what_oracle_refuses",
                        f"stored {extra!r}: not an event the oracle accepts up to its end ({o.end})"))
        elif len(stored) != len(set(stored)) or list(stored) != [e for e in full if e in stored]:
            out.append(("store_order", f"stored {stored!r}, the oracle's events are {full!r}"))
        else:
            missing = [e for e in full if e not in stored]
            out.append(("lost", f"did not store {missing!r} (the oracle accepts them; no policy lets the "
                                f"front refuse there); stored {stored!r}"))

    # the connection: answered what it owes, closes only when it said so
    owed = o.answers_owed
    if seen.closed_early:
        if finals and not finals[-1].announces_close:
            out.append(("unannounced_close", f"closed the connection after {finals[-1]} (no Connection: close)"))
        elif not finals and owed:
            out.append(("closed_without_answer", f"closed without answering any of {owed} requests"))
    elif len(finals) < owed:
        out.append(("silent", f"answered {len(finals)} of {owed} requests, then neither answered nor closed"))
    elif o.end in ("closed", "refused", "error"):
        out.append(("not_closed", f"kept the connection open after its end ({o.end})"))
    if seen.probe == "unanswered":
        last = finals[-1] if finals else None
        out.append(("unannounced_close", f"the next request after {last} was not answered (no Connection: close)"))

    # a refused (policy) or malformed (h11) request: a 4xx, then nothing more is served
    if o.end in ("refused", "error"):
        t = len(reqs) - 1 if o.end == "refused" else len(reqs)
        why = reqs[t].reason if o.end == "refused" else f"h11: {o.error}"
        if len(finals) > t and not refusal(finals[t]):
            out.append(("accepted_refused", f"answered {finals[t]} to request {t}, which must be refused ({why})"))
        if len(finals) > t + 1 or seen.probe == "answered":
            out.append(("served_after_refusal", f"served requests after request {t} ({why})"))

    # 1xx: only to an HTTP/1.1 request that asked for it and is not refused from its head (also to
    # the last one when its body has not all come: the client may be waiting for the 100 to send it;
    # and before the 413 of a chunked body, whose size the server learns only by reading it)
    heads = [*reqs, o.pending] if o.pending is not None else list(reqs)
    idx = 0
    for a in seen.answers:
        if not a.interim:
            idx += 1
            continue
        if idx >= len(heads):
            out.append(("continue_before_refusal", f"{a} before the answer to the malformed request {idx}"))
        elif heads[idx].version == "1.0":
            out.append(("continue_http10", f"{a} to HTTP/1.0 request {idx} (RFC 9110 §10.1.1: ignore Expect)"))
        elif heads[idx].kind is Kind.REFUSE and heads[idx].reason != UNANNOUNCED_TOO_LARGE:
            out.append(("continue_before_refusal", f"{a} before refusing request {idx} ({heads[idx].reason})"))
        elif "expect" not in heads[idx].head_names:
            out.append(("continue_unasked", f"{a} to request {idx}, which has no Expect"))

    # an HTTP/1.0 connection the server kept serving must have been announced with keep-alive
    served_after = len(finals) + (seen.probe == "answered")
    for i, j in enumerate(reqs[:len(finals)]):
        if j.version == "1.0" and i + 1 < served_after and "keep-alive" not in finals[i].connection:
            out.append(("http10_held_open_unannounced",
                        f"served request {i + 1} after HTTP/1.0 request {i} answered {finals[i]}"))
    return sorted(out, key=lambda kv: PRIORITY.index(kv[0]))


def refusal(a: Answer) -> bool:
    """A 4xx, or 501 (RFC 9112 §6.1: a transfer coding the server does not understand)."""
    return 400 <= a.status < 500 or a.status == 501


# the order violations are reported in (the first names the bug hypothesis shrinks): what reached
# the sink first, then what a client or a proxy sees on the connection
PRIORITY = ("stored_what_oracle_refuses", "lost", "store_order", "accepted_refused", "served_after_refusal",
            "unannounced_close", "closed_without_answer", "silent", "not_closed", "continue_http10",
            "continue_before_refusal", "continue_unasked", "http10_held_open_unannounced", "server_error")
