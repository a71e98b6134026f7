"""build_app(): the FastAPI application; its lifespan owns the Gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cortex import __version__
from cortex.config import CortexSettings
from cortex.gateway import admin, errors, fleet_page, routes
from cortex.gateway.service import Gateway
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError

log = logging.getLogger(__name__)


def build_app(settings: CortexSettings, catalogue: Catalogue | None = None) -> FastAPI:
    gateway = Gateway(settings, catalogue or Catalogue.load(settings.models_config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await gateway.start()
        except CortexError as exc:
            log.error("gateway cannot start: %s", exc.message)
            await gateway.aclose()
            raise
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(title="cortex", version=__version__, lifespan=lifespan)
    app.state.gateway = gateway
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(routes.v1)
    app.include_router(admin.router)
    app.include_router(fleet_page.router)
    return app
