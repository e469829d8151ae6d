"""The chain's steps: one mitmproxy addon per concern, in the order `regproxy.chain` declares them."""
