"""journey-export: export SFMC journey history in resumable windows."""

from __future__ import annotations

__version__ = "0.1.0"
