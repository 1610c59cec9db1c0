"""Ask SFMC about windows before exporting them: estimates and the history lag."""

from __future__ import annotations

import logging
import ssl

import anyio

from orchestrator.auth import TokenSource
from orchestrator.config import RunSettings
from orchestrator.credentials import Credentials
from orchestrator.download import Estimate, JourneyHistoryClient
from orchestrator.errors import WindowError
from orchestrator.planner import Window
from orchestrator.session import open_session

logger = logging.getLogger(__name__)


async def history_lag(credentials: Credentials, settings: RunSettings) -> float:
    """The history lag in seconds from the freshness call, or the fallback."""
    fallback = settings.history_lag_fallback_seconds
    async with open_session(settings) as session:
        tokens = TokenSource(
            session, credentials, allowed_domains=settings.http.allowed_domains
        )
        client = JourneyHistoryClient(session, tokens, settings.request)
        try:
            lag = await client.freshness()
        except WindowError as error:
            logger.warning(
                "freshness unavailable (%s); assuming %.0f s", error, fallback
            )
            return fallback

    return fallback if lag is None else lag


async def estimate_windows(
    settings: RunSettings,
    credentials: Credentials,
    windows: list[Window],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> list[tuple[Window, Estimate | None]]:
    """Each of ``windows`` with its estimate, None where failed or unreadable."""
    found: dict[Window, Estimate | None] = {}
    limiter = anyio.CapacityLimiter(settings.concurrency)
    async with open_session(settings, ssl_context) as session:
        client = JourneyHistoryClient(
            session,
            TokenSource(
                session, credentials, allowed_domains=settings.http.allowed_domains
            ),
            settings.request,
        )

        async def estimate(window: Window) -> None:
            async with limiter:
                try:
                    found[window] = await client.estimate(window)
                except WindowError as error:
                    logger.warning("window %s: estimate failed: %s", window, error)
                    found[window] = None

            if found[window] is None:
                logger.warning("window %s: no readable estimate", window)

        async with anyio.create_task_group() as group:
            for window in windows:
                group.start_soon(estimate, window)

    return [(window, found[window]) for window in windows]
