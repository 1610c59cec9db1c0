"""The built-in sandbox: a deterministic local stand-in for the journey history API.

Run it in-process with `async with SandboxServer(settings) as sandbox:`, or until
cancelled with `serve(settings, port=N)` (what `journey-export sandbox` does).
"""

from __future__ import annotations

from orchestrator.sandbox.faults import (
    KINDS,
    FaultInjector,
    FaultRule,
    FaultSettings,
    parse_faults,
)
from orchestrator.sandbox.history import History, Row, Window, render
from orchestrator.sandbox.server import DEFAULT_PORT, SandboxServer, check_host, serve
from orchestrator.sandbox.settings import SandboxSettings, settings_from_options
from orchestrator.sandbox.stats import SandboxStats, window_key

__all__ = [
    "DEFAULT_PORT",
    "KINDS",
    "FaultInjector",
    "FaultRule",
    "FaultSettings",
    "History",
    "Row",
    "SandboxServer",
    "SandboxSettings",
    "SandboxStats",
    "Window",
    "check_host",
    "parse_faults",
    "render",
    "serve",
    "settings_from_options",
    "window_key",
]
