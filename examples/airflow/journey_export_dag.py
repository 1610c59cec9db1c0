"""journey-export in Airflow: a nightly incremental export of SFMC journey history.

One TaskFlow task runs ``journey-export run --since-last`` on the worker and turns its
exit code into what Airflow should do (see docs/scheduling.md):

    0     complete                        success; the run report goes to XCom
    5     --max-duration spent            retried after retry_delay: the next try
                                          goes on where this one stopped
    1     windows failed (state kept)     retried: only the failed windows are
                                          requested again
    4     output locked by another run    retried
    130   interrupted (state kept)        retried
    2, 3  bad usage/config, credentials   failed at once, no retry: fix it by hand

The worker needs journey-export installed (JOURNEY_EXPORT), a working folder that
outlives the task (WORKDIR: the outputs, their manifests and the --since-last state
file live there, so every try and every night must see the same folder) and the
credentials, either in the worker's environment (SFMC_CLIENT_ID, SFMC_CLIENT_SECRET,
SFMC_AUTH_URL, SFMC_ACCOUNT_ID) or in the file that ``[credentials] file`` names in
the config. catchup is off and one run at a time: --since-last finds the range itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

try:  # Airflow 3
    from airflow.sdk import dag, task
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.x
    from airflow.decorators import dag, task
    from airflow.exceptions import AirflowException, AirflowFailException

JOURNEY_EXPORT = "/opt/journey-export/.venv/bin/journey-export"
WORKDIR = Path("/var/lib/journey-export")
REPORT = "reports/last-run.json"
# --start is read by the very first run only; afterwards the state file says where
# to go on. Nothing here is a shell command: no quoting, and % needs no escape.
EXPORT_ARGS = [
    "--log-format",
    "json",
    "run",
    "--config",
    "/etc/journey-export/journey-export.toml",
    "--since-last",
    "--start",
    "2026-12-01",
    "--output",
    "exports/journey_{start:%Y%m%dT%H%MZ}.csv",
    "--max-duration",
    "50m",
    "--report",
    REPORT,
    "--quiet",
]
FAIL_FAST = {
    2: "bad usage, configuration or input",
    3: "credentials rejected by SFMC",
}
# Longer than --max-duration: windows in flight when the budget runs out finish first.
TASK_TIMEOUT = timedelta(minutes=60)
STOP_GRACE_SECONDS = 120

log = logging.getLogger(__name__)


def run_journey_export() -> dict[str, Any]:
    """Run the export; return its report, or raise what Airflow should do next."""
    process = subprocess.Popen(
        [JOURNEY_EXPORT, *EXPORT_ARGS],
        cwd=WORKDIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.info("%s", line.rstrip())
        code = process.wait()
    finally:
        # A task timeout or a kill lands here: SIGTERM makes journey-export keep its
        # state and release the output's lock, so the next try can go on.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()

    if code in FAIL_FAST:
        raise AirflowFailException(
            f"journey-export exit {code}: {FAIL_FAST[code]}; not retried"
        )
    if code != 0:
        raise AirflowException(
            f"journey-export exit {code} (5 time budget spent, 1 windows failed, "
            "4 output locked, 130 interrupted); the next try goes on"
        )
    report: dict[str, Any] = json.loads((WORKDIR / REPORT).read_text())
    return {key: report.get(key) for key in ("output", "start", "end", "rows")}


@dag(
    dag_id="journey_export",
    schedule="30 2 * * *",
    start_date=datetime(2026, 12, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["journey-export"],
    doc_md=__doc__,
)
def journey_export() -> None:
    @task(
        retries=6,
        retry_delay=timedelta(minutes=10),
        execution_timeout=TASK_TIMEOUT,
    )
    def export() -> dict[str, Any]:
        return run_journey_export()

    export()


journey_export()
