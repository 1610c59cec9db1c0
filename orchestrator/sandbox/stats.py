"""What the sandbox saw: counts kept in memory, readable from Python and over HTTP."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from orchestrator import sfmc

NO_ANSWER = 0


def window_key(start_ms: int, end_ms: int) -> str:
    """The key a download window is counted under: `start/end`, times as the API's."""
    return f"{sfmc.format_time(start_ms)}/{sfmc.format_time(end_ms)}"


@dataclass(slots=True)
class SandboxStats:
    """Running counts; `answers` counts by HTTP status, NO_ANSWER (0) for a reset."""

    requests: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)
    token_requests: int = 0
    downloads: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    active_downloads: int = 0
    peak_concurrent_downloads: int = 0

    def count_attempt(self, key: str) -> int:
        """Count one more download attempt of a window; return its number, from 1."""
        self.downloads[key] += 1
        return self.downloads[key]

    def download_started(self) -> None:
        """Note a download now streaming, keeping the peak."""
        self.active_downloads += 1
        self.peak_concurrent_downloads = max(
            self.peak_concurrent_downloads, self.active_downloads
        )

    def download_finished(self) -> None:
        """Note a download no longer streaming."""
        self.active_downloads -= 1

    def as_dict(self) -> dict[str, object]:
        """The counts as JSON-ready values."""
        return {
            "requests": dict(self.requests),
            "answers": {str(status): count for status, count in self.answers.items()},
            "token_requests": self.token_requests,
            "downloads": dict(self.downloads),
            "faults": dict(self.faults),
            "active_downloads": self.active_downloads,
            "peak_concurrent_downloads": self.peak_concurrent_downloads,
        }

    def reset(self) -> None:
        """Forget every count except the downloads now streaming."""
        active = self.active_downloads
        for counter in (self.requests, self.answers, self.downloads, self.faults):
            counter.clear()

        self.token_requests = 0
        self.peak_concurrent_downloads = self.active_downloads = active
