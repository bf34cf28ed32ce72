"""A worker rank started by dsv3.serving.workers.LocalRanks: `python -m dsv3.serving.worker`.

Reads rank 0's EngineArgs (pickled) from standard input, loads this rank's part of the model and runs
the steps rank 0 sends until it says stop. A failure is written in one line to the status pipe rank 0
reads, and the process exits 1. It exits too as soon as its parent (rank 0) is gone.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback

from dsv3.serving.workers import POLL_SECONDS, STATUS_FD, serve_steps


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os._exit(1)
    threading.Thread(target=watch, name="dsv3-parent-watch", daemon=True).start()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops every rank
    _exit_with_parent(os.getppid())
    status = os.fdopen(int(os.environ[STATUS_FD]), "w")
    rank = os.environ.get("RANK", "?")
    try:
        settings = pickle.load(sys.stdin.buffer)  # an EngineArgs
        serve_steps(settings.build())
    except BaseException as e:  # noqa: BLE001 - every failure is reported to rank 0, then the process ends
        message = str(e).splitlines()[0] if str(e) else ""
        status.write(f"{type(e).__name__}: {message}\n")
        status.flush()
        print(f"dsv3: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
