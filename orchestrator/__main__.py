"""Run the command line as ``python -m orchestrator``."""

from __future__ import annotations

from orchestrator.launch import run_and_exit

run_and_exit()
