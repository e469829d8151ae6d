"""registryproxy's entry script for mitmproxy: `mitmdump -s addon/registryproxy.py`.

A thin entry: mitmproxy loads scripts outside `sys.modules`, so the addons live in the
`regproxy` package beside this file; the chain and its order are in regproxy/chain.py.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from regproxy import chain

addons = [chain.script()]
