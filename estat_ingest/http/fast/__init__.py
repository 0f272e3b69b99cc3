"""The httptools HTTP/1.1 front (`HTTP_FRONT=fast`): asyncio.Protocol + httptools, calling the
plain /collect function.

`front.py` is the listener (`Front`: start, stop_listening, close, the one-per-second sweep),
`protocol.py` one connection (`HttpConn`: the parser callbacks, timers, refusals), `render.py`
the response bytes.

Why: the profile of `estat-ingest serve` under load (docs/tuning.md) shows aiohttp's request
machinery (Request/Response objects, the handler task, StreamReader, header multidicts, response
serialisation) taking most of the loop. `Collector.handle` is synchronous and independent of
aiohttp (DESIGN.md §1), so this front only parses (httptools, the llhttp parser uvicorn uses),
calls it and writes the reply: no task per request, no awaits, one sweep per second for every
timer instead of a timer per request. Answers are handed to the transports once per pass of the
loop (`HttpConn.write` queues, `Front.flush` writes each connection's answers in one call), so the
clients of a pass are answered back to back (docs/tuning.md, "Answers once per pass").

`app.serve()` runs it when `settings.http_front == "fast"` (`HTTP_FRONT`, the default), with the
same pipeline and the same shutdown path as the aiohttp front (`Front` has the three methods
`http.fronts.HttpFront` asks for).

What it does; the limits, answers, admission and draining close are the edge policy's
(http/policy.py), the same as the aiohttp front's, and docs/security.md lists what still differs:
- routes: `/collect` and the pixel paths (any method; `Collector.handle` answers 405 itself),
  `/health`, `/ready`, `/metrics` (GET and HEAD, else 405 with `Allow`), 404 otherwise; a HEAD
  answer has the headers of the GET answer and no body;
- `MAX_IN_FLIGHT`: a /collect request is admitted (`Collector.inflight`, which shutdown waits
  for) once its headers are complete and counted until it is answered; past the cap, 503
  `overloaded` with `Retry-After: 1`, connection closed, the body never read;
- 413 from Content-Length before any body byte is read, or as soon as a (chunked) body passes
  MAX_BODY_SIZE; a request line over the policy's bound is 413 when it has a query (the GET
  payload), 431 otherwise;
- header limits: a header line over MAX_HEADER_BYTES or more than MAX_HEADERS headers is 431
  (`header_too_large`; the aiohttp front answers 400). httptools accumulates a header without a
  bound until it is complete, so the bytes of a header section still in progress are bounded too;
- malformed HTTP (llhttp in strict mode: smuggling shapes, bad framing, non-HTTP bytes, raw
  non-ASCII bytes in the request target, an HTTP/1.1 request without Host) and what the edge
  policy refuses on top (a repeated framing header, CONNECT with a body, a percent-encoded path,
  chunked framing over its bound) is 400 `bad_http`; both counted in
  `http_requests_rejected_total{reason}` and logged at most once per reason per 10 s
  (`policy.ProtocolErrors`, shared with the aiohttp front);
- an Upgrade request or CONNECT is a plain request (policy.py, "Framing"): llhttp stops parsing at
  it and skips its body, so a new parser goes on with the bytes after its head, first fed a head
  with the request's framing when its body is still to be read (`HttpConn._after_upgrade`);
- HEADER_READ_TIMEOUT: a connection's first request must complete its headers within it from
  the connection's start, a later request from its first byte; else the connection is closed
  without an answer (`header_timeout`); REQUEST_READ_TIMEOUT: a body not complete within it
  from the end of the headers is 408 (`read_timeout`), connection closed;
- after a refusal the connection stops parsing, sends the answer, half-closes and discards what
  the client still sends for at most the linger time (so the client reads the answer instead of a
  reset), then closes; an idle keep-alive connection is closed after the keep-alive time;
- `Expect: 100-continue` (HTTP/1.1 only, never before a refusal), chunked bodies, pipelined
  requests answered in order, `Connection: close` on every answer after which the connection ends
  (also once the server is draining), `Connection: keep-alive` when the request asked for it,
  header values decoded as UTF-8 with surrogate escapes (as aiohttp does, so non-UTF-8 bytes are
  stored as U+FFFD by `/collect`).
"""
