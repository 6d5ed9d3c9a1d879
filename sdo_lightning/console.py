"""The ``sdo`` console script: CPU threading settled before torch is imported, then the CLI.

On a CPU whose cores other jobs share, OpenMP's default (active) wait policy makes torch's
worker threads spin while they wait for a core: a 50-step sampling pass of the digits model took
3.19 s with two threads against 0.97 s with ``OMP_WAIT_POLICY=PASSIVE`` (BENCHMARKS.md, "CPU
threads"). The OpenMP runtime reads its settings once, when torch loads it, so they are set here,
before anything imports torch. A value in the user's own environment always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: OpenMP settings ``sdo`` uses unless the environment sets them
CPU_THREAD_DEFAULTS: dict[str, str] = {
    # idle threads sleep instead of spinning: no cost measured on an idle machine (BENCHMARKS.md)
    "OMP_WAIT_POLICY": "PASSIVE",
}


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :data:`CPU_THREAD_DEFAULTS` into ``environ`` (default ``os.environ``) where unset;
    return what was set. Call it before torch is imported, or it has no effect on this process."""
    environ = os.environ if environ is None else environ
    chosen = {k: v for k, v in CPU_THREAD_DEFAULTS.items() if k not in environ}
    environ.update(chosen)
    return chosen


def main() -> None:
    configure_cpu_threads()
    from sdo_lightning.cli import console_main  # imports torch: after the settings above

    console_main()


if __name__ == "__main__":
    main()
