"""The first line of a benchmark's output: when, on what, and how busy the machine was.

A figure without its machine and load is not one (benchmarks/README.md); the scripts print
this before they measure and the load again after.
"""

from __future__ import annotations

import datetime as dt
import os
import platform

import torch


def header() -> str:
    return (
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}"
        f", {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}"
    )
