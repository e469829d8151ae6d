"""What the steps share about one flow: its state, the answers the proxy gives itself, facts read off a
message, and the background tasks a step starts.
"""
