"""registryproxy's entry script for mitmproxy: `mitmdump -s addon/registryproxy.py`.

A thin entry: mitmproxy loads scripts outside `sys.modules`, so the addons live in the
`regproxy` package beside this file; the chain and its order are in regproxy/chain.py.

Before the chain is imported, regproxy/run/preflight.py checks that the Python running this
mitmproxy has the addon's packages and that the mitmproxy is one the addon fits. If not, its
one line is logged as an error and no chain is loaded: mitmproxy then ends its start-up
("Error logged during startup, exiting...") instead of running a proxy that does nothing.
"""

import logging
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from regproxy.run import preflight


def _load() -> list[object]:
    problem = preflight.problem()
    if problem is None:
        try:
            from regproxy import chain
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] in ("regproxy", "mitmproxy"):
                raise
            problem = preflight.missing_module(e)
        else:
            return [chain.script()]
    logging.getLogger("registryproxy").error(problem)
    return []


addons = _load()
