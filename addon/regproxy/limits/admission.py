"""What admitting one routed request asks of the store: the checks it must pass, and what it then holds.

Each limit that applies to the request is one `Check`, named by its limit (for the 429's message and
the metrics), in a fixed order: the client's request bucket, the mapping's manifest window, the byte
budgets (checked only for a blob: a manifest GET is charged, never refused by them), the client's
transfer slots. What an admitted request holds (`Held`: byte windows to charge when its response
arrives, a transfer slot to give back when it ends) is returned beside the checks. Nothing here
imports mitmproxy.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.names import RouteKind
from .settings import Rate, Rules
from .store import Check


class Budgeted(Protocol):
    """What admission reads of a mapping (`config.Mapping` is one; limits sit below config, so the type
    is named by what it has)."""

    @property
    def label(self) -> str: ...

    @property
    def limits(self) -> Rules | None: ...


@dataclass
class Held:
    """What an admitted flow holds: byte windows to charge, a transfer slot to give back."""

    mapping: str
    byte_windows: list[tuple[str, str, Rate]] = field(default_factory=list)  # (limit, key, rate)
    slot: tuple[str, str] | None = None  # (key, lease)
    charged: int = 0


@dataclass(frozen=True)
class Admission:
    """The checks a request must pass, the limit each stands for, and what it holds once admitted."""

    checks: list[Check]
    names: list[str]
    held: Held


def new_lease() -> str:
    return uuid.uuid4().hex


def admission(
    rules: Rules,
    mapping: Budgeted,
    kind: RouteKind | None,
    method: str,
    client: str,
    lease: Callable[[], str] = new_lease,
    *,
    cached: bool = False,
) -> Admission:
    """The checks for a request of this route `kind` and `method` through `mapping`, from `client` (its
    key, needed only when `rules.per_client`). A `cached` answer (from the cache's store) neither spends
    nor is refused by `mapping_bytes`, the budget that protects the upstream; the client's limits apply."""
    own = mapping.limits
    given = own.given if own is not None else frozenset()
    label = mapping.label

    def scope(name: str) -> str:
        # A limit the mapping sets itself is a budget of that mapping; a default is one budget.
        return f"{name}:{label}:{client}" if name in given else f"{name}:*:{client}"

    checks: list[Check] = []
    names: list[str] = []
    held = Held(label)
    get = method == "GET"
    if rules.client_requests is not None:
        per_second = rules.client_requests.per_second
        checks.append(Check("bucket", scope("client_requests"), rules.burst, per_second))
        names.append("client_requests")
    if kind is RouteKind.MANIFEST and rules.manifest_gets is not None and (get or rules.count_heads):
        gets = rules.manifest_gets
        checks.append(Check("window", f"manifest_gets:{label}", gets.amount, gets.window))
        names.append("manifest_gets")
    if get and kind in (RouteKind.MANIFEST, RouteKind.BLOB):
        for name, rate, key in (
            ("mapping_bytes", rules.mapping_bytes, f"mapping_bytes:{label}"),
            ("client_bytes", rules.client_bytes, scope("client_bytes")),
        ):
            if rate is None or (cached and name == "mapping_bytes"):
                continue
            held.byte_windows.append((name, key, rate))
            if kind is RouteKind.BLOB:  # the breaker refuses new transfers; manifests only count
                checks.append(Check("window", key, rate.amount, rate.window, count=False))
                names.append(name)
    if get and kind is RouteKind.BLOB and rules.client_transfers is not None:
        key, taken = scope("client_transfers"), lease()
        checks.append(Check("slots", key, rules.client_transfers, lease=taken))
        names.append("client_transfers")
        held.slot = (key, taken)
    return Admission(checks, names, held)
