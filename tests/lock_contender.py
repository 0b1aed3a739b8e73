"""One of several processes racing for workdir locks, trial by trial (tests/test_lock.py).

    python tests/lock_contender.py BASE TRIALS ID SYNC_DIR

For trial k it says it is ready (SYNC_DIR/ready_k_ID), waits for SYNC_DIR/go_k, then calls
`workdir.acquire_lock(BASE/tk)` at once and prints "k won", "k refused <message>" or
"k crashed <error>". The locks it wins stay held until it exits.
"""

import os
import sys
import time

from etils import epath

from pcjax.training import workdir


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.0005)


def main(base: str, trials: int, me: str, sync: str) -> None:
    for k in range(trials):
        open(os.path.join(sync, f"ready_{k}_{me}"), "w").close()
        _wait_for(os.path.join(sync, f"go_{k}"))
        try:
            workdir.acquire_lock(epath.Path(f"{base}/t{k}"))
            print(k, "won", flush=True)
        except workdir.WorkdirError as error:
            print(k, "refused", str(error).replace("\n", " "), flush=True)
        except Exception as error:  # what the test must never see
            print(k, "crashed", type(error).__name__, error, flush=True)
    open(os.path.join(sync, f"finished_{me}"), "w").close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
