"""The suite's timing budgets in one place, scaled by this machine's measured speed.

A budget is how long something may take on the machine the suite was tuned on. Once per session the
suite times a calibration on this machine, as two processes at once (each: import the training stack,
then a fixed torch workload on one thread), so it sees both a slower CPU and fewer free cores
(`taskset -c 0`). Every budget is multiplied by that time over the reference time, never below 1:
a faster machine keeps the budgets as they are, a slower one gets proportionally more.
ADAPTERY_TEST_TIME_SCALE sets the factor by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import lru_cache

# The calibration's wall time on the machine the budgets were tuned on: a 2-core AMD EPYC (Zen 5, AVX-512)
# VM, fp32 matmul ~90 GFLOP/s on one thread, warm disk cache (4.21 and 4.28 s there; 8.96 s under
# `taskset -c 0`). Measure a machine with `python -m tests.budgets`.
REFERENCE_SECONDS = 4.3

CALIBRATION = """
import time
started = time.perf_counter()
import torch, transformers, peft
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
a = torch.randn(512, 512)
for _ in range(400):
    a = torch.tanh(a @ a.T / 512)
print(time.perf_counter() - started)
"""


def calibration_seconds() -> float:
    """Wall time for two calibration processes run at once. One try: a cold disk can only make it slower, and a
    factor too high only lengthens waits that a passing test never reaches, while every try costs seconds of CPU."""
    started = time.perf_counter()
    runs = [subprocess.Popen([sys.executable, "-c", CALIBRATION], stdout=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        run.communicate(timeout=600)
    return time.perf_counter() - started


def factor_for_parallel_run(processes: int) -> float:
    """The factor for a run of `processes` test processes at once (pytest-xdist), measured before they start:
    this machine's speed, times how many test processes share each core (each runs its own servers and
    workers, so every wait in one of them stretches by about that much). Measured once the processes run,
    the calibration would instead see whatever they happened to be doing (x8.2 beside the real-model test's
    training, x1.3 on the idle 2-core machine), and every budget would inflate by that chance."""
    cores = len(os.sched_getaffinity(0))  # what `taskset` leaves this run, not the machine's count
    return max(1.0, calibration_seconds() / REFERENCE_SECONDS) * max(1.0, processes / cores)


@lru_cache(maxsize=1)
def speed_factor() -> float:
    """ADAPTERY_TEST_TIME_SCALE when set (by hand, or by tests/conftest.py for the processes of a parallel run),
    else measured here, once per process."""
    explicit = os.environ.get("ADAPTERY_TEST_TIME_SCALE")
    if explicit:
        return float(explicit)
    return max(1.0, calibration_seconds() / REFERENCE_SECONDS)


def budget(seconds: float) -> float:
    """`seconds` on the reference machine, scaled to this one."""
    return seconds * speed_factor()


# Named budgets (reference-machine seconds) for what many tests wait on.
STACK_READY = 90.0  # an API and a worker started, until /ready
API_UP = 60.0  # an API process started, until it answers and has warmed up
JOB_DONE = 180.0  # a small job on the tiny model, queued to terminal
HTTP_REQUEST = 120.0  # one request to a test stack
# A bound on a wait that ends at once unless something is broken (a thread that never runs, an event never sent):
# long enough for any machine, so it is not scaled and costs no calibration; only a failing test waits this long.
UNLESS_BROKEN = 120.0


if __name__ == "__main__":
    measured = calibration_seconds()
    print(f"calibration: {measured:.2f} s (reference {REFERENCE_SECONDS} s) → factor "
          f"{max(1.0, measured / REFERENCE_SECONDS):.2f}")
