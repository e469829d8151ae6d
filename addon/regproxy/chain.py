"""The registryproxy addon chain: declared once, in order. The order is the design.

Each hook runs on the steps in this order, so each step below sees what the steps before it did.
Both `addon/registryproxy.py` (`mitmdump -s`) and the lean master (`regproxy.run.serve`) take this chain
as one addon (`proxy()`: see `dispatch` for why one); under mitmdump the script runs where the script
loader stands, before the display (mitmweb's view), flow saving (`-w`) and mitmdump's dump.
"""

from __future__ import annotations

from .flow.state import FlowStates
from .mitm.chain_addon import ChainAddon
from .ops.metrics import Metrics
from .steps.access_log import AccessLog
from .steps.cache import Cache
from .steps.client_timeout import ClientTimeout
from .steps.config_loader import Configuration
from .steps.error_pages import RegistryErrors
from .steps.keep_bodies import KeepBodies
from .steps.limits import Limits
from .steps.local_address import LocalAddress
from .steps.ops_endpoints import Operations
from .steps.policy import ServePolicy
from .steps.pooling import UpstreamPooling
from .steps.rewrite import ResponseRewrite
from .steps.routing import Router
from .steps.token_endpoint import TokenEndpoint
from .steps.upstream_tls import UpstreamTls
from .steps.upstream_watch import UpstreamWatch
from .steps.veil import FlowSecrets, Unveil, Veil


def proxy() -> ChainAddon:
    """The chain of one proxy process, as the one addon mitmproxy runs."""
    return ChainAddon(addons())


def script() -> ChainAddon:
    """The chain as `mitmdump -s addon/registryproxy.py` loads it: a bad option or configuration at
    start-up is one log line (and mitmproxy's exit), not a script error with a traceback."""
    return ChainAddon(addons(), log_startup_option_errors=True)


def addons() -> list[object]:
    """A new chain: the addons of one proxy process, sharing one configuration and one set of metrics."""
    metrics = Metrics()
    config = Configuration(metrics)
    secrets = FlowSecrets(config)
    cache = Cache(config, metrics)
    return [
        # Every new flow gets its state before anyone looks at it.
        FlowStates(),
        # The chain works on the real response: put back what `Veil` hid after the last hook.
        Unveil(secrets),
        # mitmproxy's own error pages become registry errors (patches installed on load).
        RegistryErrors(),
        # Health and metrics answer even without a configuration, so they come before its 503.
        Operations(metrics, config.ready),
        # The configuration (and reload); answers 503 to everything else until one is valid.
        config,
        # Counts a request as in progress from its `request` hook; independent of the rest.
        ClientTimeout(),
        # `/token` is claimed before routing, which treats every other path as a registry route.
        TokenEndpoint(config, metrics),
        # Rate limits and the bandwidth breaker: keeps a trusted front end's forwarding headers before Router
        # drops them; decides in `request`, after every step's `requestheaders` (Router's match) and before
        # anything goes upstream.
        Limits(config, metrics),
        Router(config),
        # What the mapping serves (allow, deny, digests): refuses in `requestheaders`, after Router's match and
        # before the cache plans anything or anything goes upstream; reads the cache's record of resolved digests.
        ServePolicy(config, cache.holder, metrics),
        # The pull-through cache: looks up in `requestheaders`, after Router's match, so that Limits (in
        # `request`) knows an answer from the store; answers in `request`, after Limits admitted it.
        cache,
        # Upstream connections shared across clients (TLS, trust and forward proxy set up by the pool)...
        UpstreamPooling(config),
        # ...and TLS to the upstream with the mapping's trust for connections mitmproxy opens itself (system store + ca_file, or tls_verify: false);
        # the master runs the chain before TlsConfig, which leaves a connection set up here alone.
        UpstreamTls(lambda: config.state.config if config.state is not None else None),
        # The upstream's answer in local terms; it decides whether the body streams...
        ResponseRewrite(config, metrics),
        # Bodies worth reading in mitmweb (manifests, indexes, configs) are kept, not streamed: it undoes the
        # rewrite's streaming for them, so it comes after it and before the watch, which guards what streams.
        KeepBodies(),
        # ...and the watch wraps a streaming body, so it comes after; it also times the upstream.
        UpstreamWatch(config, metrics),
        # The outcome, once every step above has had its say: log line, metrics, mitmweb mark.
        AccessLog(config, metrics),
        # Answered locally: the flow shows the proxy's address as the client used it, not the dead default
        # target; after everything that answers or fails a flow, and before Veil's last word.
        LocalAddress(),
        # Last: whatever runs after the chain (mitmweb, -w, the dump) sees no secret. Its `Courier`
        # goes to the very end of the master's chain, to put back what is sent in the last update.
        Veil(secrets),
    ]
