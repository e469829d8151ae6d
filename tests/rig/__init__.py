"""End-to-end test rig: real registries, a token issuer, a blob server, skopeo and mitmdump."""
