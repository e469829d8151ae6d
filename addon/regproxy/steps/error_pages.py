"""mitmproxy's own error answers become registry errors: the step that installs the patches (mitm/error_pages.py)
when the chain loads."""

from __future__ import annotations

from ..mitm import error_pages


class RegistryErrors:
    """Installs mitm/error_pages.py's patches on load (once a process)."""

    def load(self, loader: object) -> None:
        error_pages.install()
