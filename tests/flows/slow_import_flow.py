"""A task module that is slow to import (as one importing torch or tensorflow is).

A fresh worker process imports it before it can start the step; a task timeout must
bound the attempt itself, not the worker's start-up. Imported lazily by the tests.
"""

from __future__ import annotations

import time

import keel

IMPORT_SECONDS = 4.0
time.sleep(IMPORT_SECONDS)


def quick_body() -> str:
    """Returns at once: far within its timeout."""
    return "done"


# Decorated by a call, so that the module keeps the plain function under its own
# name: cloudpickle then sends it by reference and the worker imports this module.
quick = keel.task(name="slow_import_quick", timeout=2.0, executor="processes")(quick_body)


@keel.workflow(name="slow_import_wf")
def slow_import_wf() -> str:
    return quick()
