"""Starting the proxy: the command line of ./run.sh, mitmproxy's arguments, workers behind HAProxy, and
the lean master.
"""
