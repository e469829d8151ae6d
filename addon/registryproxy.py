"""registryproxy's entry script for mitmproxy: `mitmdump -s addon/registryproxy.py`.

A thin entry: mitmproxy loads scripts outside `sys.modules`, so the addon lives in the
`regproxy` package beside this file (see regproxy/addon.py).
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from regproxy.addon import RegistryProxy

addons = [RegistryProxy()]
