"""cache/admitted.py: what an admitted manifest lists, and the records it writes (a directory store)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from regproxy.cache import keys
from regproxy.cache.admitted import listed
from regproxy.cache.keys import AdmittedRecord
from regproxy.cache.service import CacheService
from regproxy.cache.settings import parse_cache

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def test_an_index_lists_its_manifests_and_an_image_its_config_and_layers() -> None:
    index = {"manifests": [{"digest": f"sha256:{A}"}, {"digest": f"sha256:{B}"}], "subject": {"digest": f"sha256:{D}"}}
    assert listed(json.dumps(index).encode()) == [A, B]  # never the subject
    image = {"config": {"digest": f"sha256:{C}"}, "layers": [{"digest": f"sha256:{A}"}, {"digest": f"sha256:{A}"}]}
    assert listed(json.dumps(image).encode()) == [C, A]
    assert listed(json.dumps({"blobs": [{"digest": f"sha256:{B}"}]}).encode()) == [B]


def test_what_is_not_a_manifest_lists_nothing() -> None:
    for body in (None, b"", b"not json", b"[]", b'{"layers":"x"}', b'{"layers":[{"digest":"sha512:00"}, 3, null]}'):
        assert listed(body) == []


def test_records_survive_a_new_service_on_the_same_store(tmp_path: Path) -> None:
    settings = parse_cache({"store": str(tmp_path / "store")}, {}, None)
    assert settings is not None

    async def run() -> tuple[AdmittedRecord | None, AdmittedRecord | None, AdmittedRecord | None]:
        first = await CacheService.open(settings, tmp_path, None)
        image = {"config": {"digest": f"sha256:{B}"}, "layers": [{"digest": f"sha256:{C}"}]}
        await first.admit("link1", [A, *listed(json.dumps(image).encode())], "v1")
        await first.aclose()
        second = await CacheService.open(settings, tmp_path, None)
        try:
            return await second.admitted("link1", A), await second.admitted("link1", C), await second.admitted("l2", A)
        finally:
            await second.aclose()

    manifest, layer, elsewhere = asyncio.run(run())
    assert manifest is not None and manifest.tag == "v1" and layer is not None and layer.tag == "v1"
    assert elsewhere is None  # a record is per link: another mapping or repository has none
    assert (tmp_path / "store" / keys.admitted_key("link1", A)).is_file()


def test_a_malformed_record_reads_as_none() -> None:
    assert AdmittedRecord.load(b"{}") is None and AdmittedRecord.load(b'{"tag":"../x","at":1}') is None
    assert AdmittedRecord.load(AdmittedRecord("v1", 1.0).dump()) == AdmittedRecord("v1", 1.0)
