"""What a person debugging a pull sees: the OCI content view for mitmweb and its text, and the redaction
of secrets from everything kept or shown.
"""
