"""Run the command line as ``python -m orchestrator``."""

from __future__ import annotations

import sys

from orchestrator.launch import main

sys.exit(main())
