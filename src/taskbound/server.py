"""Running the server process: uvicorn around the app, with the optional demo."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from taskbound.api.app import create_app
from taskbound.config import Settings
from taskbound.service.runtime import open_services

log = logging.getLogger("taskbound.server")


async def run_server(
    settings: Settings, *, demo: bool = False, exit_after_demo: bool = False, broker: bool = True
) -> bool:
    """Serve until stopped (or, with ``exit_after_demo``, until the demo ends). Returns
    False when the demo failed."""
    services = await open_services(settings)
    app = create_app(settings, services=services, broker=broker)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.server.host,
            port=settings.server.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            server_header=False,
            h11_max_incomplete_event_size=settings.server.max_header_bytes,
        )
    )
    ok = True
    try:
        serving = asyncio.create_task(server.serve())
        if demo:
            while not server.started:
                if serving.done():
                    break
                await asyncio.sleep(0.05)
            if server.started:
                from taskbound.demo import run_demo

                ok = await run_demo(settings.public_url, services)
                if exit_after_demo:
                    server.should_exit = True
                else:
                    log.info("demo done; the server keeps running (Ctrl-C to stop)")
        await serving
    finally:
        await services.aclose()
    return ok
