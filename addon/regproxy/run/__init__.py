"""Starting the proxy: the command line of ./run.sh, mitmproxy's arguments, workers behind HAProxy, the
lean master, and the preflight check both entry points run before the chain is imported.
"""
