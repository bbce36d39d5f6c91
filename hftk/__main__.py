"""`python -m hftk` and the `hftk` script: the commands of hftk.cli, then a quick exit."""

import atexit
import os
import sys
import threading

from hftk.cli import main


def run() -> None:
    """main(), then an exit that skips the interpreter's teardown. With torch, transformers and datasets
    loaded, freeing every module takes 1-2 s of each process's life (each process of a launch, and the
    launcher waits for all), after everything hftk writes is already closed. Threads still working are
    waited for and the exit handlers run, as at a normal exit."""
    try:
        main()
        status = 0
    except SystemExit as ended:
        status = ended.code
        if isinstance(status, str):  # what sys.exit("text") would print
            print(status, file=sys.stderr)
            status = 1
        status = 0 if status is None else status
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
