"""`./run.sh demo`: the proxy working end to end on this machine, offline (`python -m regproxy.demo`)."""
