"""moto's S3 API served by waitress, which keeps HTTP/1.1 connections open as S3 does.

`python -m moto.server` runs on werkzeug's development server, which answers every request with
`Connection: close`: each PutObject of a benchmark then opened a new TCP connection (135 connects
in 5 s of NDJSON at 64 connections, one per object), which no client of real S3 does and which
costs a Python server loop iterations that a Go client hardly notices. Used by bench/v1.py.

    python bench/moto_keepalive.py HOST PORT
"""

from __future__ import annotations

import sys

import waitress
from moto.server import DomainDispatcherApplication, create_backend_app


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    # threads: two servers' uploaders (UPLOAD_CONCURRENCY 2 each) and the bench's own boto3 client
    waitress.serve(app, host=host, port=port, threads=6, ident=None)


if __name__ == "__main__":
    main()
