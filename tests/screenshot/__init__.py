"""mitmweb with the registryproxy addon: a launcher shared with the e2e test, and the screenshot script."""
