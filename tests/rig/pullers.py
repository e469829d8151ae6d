"""One client's pulls through the proxy, each from an empty client store: skopeo, ctr or docker.

`Puller(client, request, tmp, prefix).pull(rp, "c/app:tag")` (or `"c/app@sha256:…"`) gives the digest the
client recorded, or None when the pull failed (`last` holds what the client said). ctr pulls into a
containerd namespace of its own (`<prefix>-<n>`, removed after); docker empties its image store first;
skopeo copies every instance (`--all`) into a new directory. The daemons are the test module's
`containerd` and `dockerd` fixtures, asked for only by the client that needs them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rig import clients, daemons, proxy

_serial = itertools.count()


class Puller:
    def __init__(self, client: str, request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> None:
        self.client, self.tmp, self.prefix, self.last = client, tmp_path, prefix, ""
        self.ctr: daemons.Containerd | None = request.getfixturevalue("containerd") if client == "ctr" else None
        self.docker: daemons.Dockerd | None = request.getfixturevalue("dockerd") if client == "docker" else None

    def pull(self, rp: proxy.ProxyProc, name: str) -> str | None:
        ref = f"{rp.host}/{name}"
        if self.ctr is not None:
            ns = f"{self.prefix}-{next(_serial)}"
            try:
                res = self.ctr.ctr("images", "pull", "--plain-http", ref, namespace=ns)
                self.last = res.describe()
                return self.ctr.image_digest(ns, ref) if res.returncode == 0 else None
            finally:
                self.ctr.remove_namespace(ns)
        if self.docker is not None:
            self.docker.clear_images()
            res = self.docker.docker("pull", ref)
            self.last = res.describe()
            if res.returncode != 0:
                return None
            repo = ref.split("@")[0] if "@" in ref else ref.rsplit(":", 1)[0]
            found = [d.split("@", 1)[1] for d in self.docker.repo_digests(ref) if d.startswith(f"{repo}@")]
            return found[0] if found else None
        copied = clients.skopeo_copy(ref, self.tmp / f"skopeo-{next(_serial)}", all=True, tag="t")
        self.last = copied.describe()
        return copied.digest if copied.ok else None
