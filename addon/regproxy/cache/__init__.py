"""The pull-through cache: what it stores, where, and how it is filled (no mitmproxy import).

`settings` reads the `cache:` section; `keys` names every object in the store (content by digest,
links and tags per mapping and upstream repository); `store` is the interface both stores implement
(`store_fs`, a directory; `store_s3`, an S3-compatible bucket); `index` keeps sizes and last uses for
eviction; `fill` streams an uncached blob from the upstream into the store while clients read it;
`blobserver` is the local HTTP server the proxy routes blob GETs of cached mappings to. The step that
puts it to work is `steps/cache.py`.
"""
