"""build_app(): the FastAPI application; its lifespan builds, serves and closes the Gateway.

What a request needs before any NATS work (who may call: the keyring; how requests are
counted: the metrics and the Exchange middleware) is made here, so the app answers 401/403 the
same with or without a running gateway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cortex import __version__
from cortex.config.gateway import CortexSettings
from cortex.gateway import admin, errors, fleet_page, routes
from cortex.gateway.auth import Keyring
from cortex.gateway.exchange import ExchangeMiddleware
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.service import build_gateway
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError

log = logging.getLogger(__name__)


def build_app(settings: CortexSettings, catalogue: Catalogue | None = None) -> FastAPI:
    models = catalogue or Catalogue.load(settings.models_config)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            gateway = await build_gateway(settings, models, metrics)
        except CortexError as exc:
            log.error("gateway cannot start: %s", exc.message)
            raise
        async with gateway:
            app.state.gateway = gateway
            yield

    app = FastAPI(title="cortex", version=__version__, lifespan=lifespan)
    app.state.keyring = Keyring(settings.auth)
    app.add_middleware(ExchangeMiddleware, metrics=metrics)
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(routes.v1)
    app.include_router(admin.router)
    app.include_router(fleet_page.router)
    return app
