"""A scriptable S3 stand-in over real HTTP on 127.0.0.1, for behaviour moto cannot show:
counting every PutObject request (hidden SDK retries), 500/503/403 answers, and a slow answer
after the object was stored (the ambiguous timeout of v1 defect §9 g)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message>'
         "<RequestId>fake</RequestId></Error>")


@dataclass
class Step:
    status: int = 200
    code: str = ""
    delay_s: float = 0.0  # answer late (after storing when status == 200)


@dataclass
class FakeS3:
    script: deque[Step] = field(default_factory=deque)  # then 200 forever
    default: Step = field(default_factory=Step)
    puts: list[str] = field(default_factory=list)  # every PUT key, in order, including failed ones
    stored: dict[str, bytes] = field(default_factory=dict)
    user_agents: list[str] = field(default_factory=list)  # the User-Agent of every PUT, in order
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(status=200)
        key = request.path.split("/", 2)[2]
        body = await request.read()
        self.puts.append(key)
        self.user_agents.append(request.headers.get("User-Agent", ""))
        step = self.script.popleft() if self.script else self.default
        if step.status == 200:
            self.stored[key] = body
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.status != 200:
            return web.Response(status=step.status, text=ERROR.format(code=step.code or "InternalError"),
                                content_type="application/xml")
        return web.Response(status=200, headers={"ETag": '"x"'})

    async def start(self) -> FakeS3:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
