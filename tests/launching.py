"""Launching a script as several CPU processes with Accelerate, for the multi-process tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

# Accelerate runs CPU ranks over gloo when launched as for several GPUs with this set (`accelerate launch --cpu`
# starts one process whatever --num_processes says).
CPU_RANKS_ENV = {"ACCELERATE_USE_CPU": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_launch_command(script: str | Path, args, processes: int = 2) -> list[str]:
    """`accelerate launch` of `script` with `args` as `processes` ranks on one machine; run it with `CPU_RANKS_ENV`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), *map(str, args)]
