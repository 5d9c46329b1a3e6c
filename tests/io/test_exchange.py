"""The content-addressed exchange between a stage's driver and its Ray tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from meduet.io.exchange import Exchange, ExchangeError
from meduet.io.images import sha256_file


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_file_and_a_folder_come_back_byte_for_byte_and_each_object_is_sent_once(tmp_path: Path) -> None:
    exchange = Exchange(str(tmp_path / "exchange"))
    volume = tmp_path / "in" / "case.nii.gz"
    volume.parent.mkdir()
    volume.write_bytes(b"volume bytes" * 1000)
    series = tmp_path / "in" / "series"
    (series / "sub").mkdir(parents=True)
    (series / "1.dcm").write_bytes(b"slice one")
    (series / "sub" / "2.dcm").write_bytes(b"slice two")
    (series / "copy.dcm").write_bytes(b"slice one")  # same bytes: one object

    packed_volume, packed_series = exchange.pack(volume), exchange.pack(series)
    assert packed_volume == {"": sha256_file(volume)}
    assert sorted(packed_series) == ["1.dcm", "copy.dcm", "sub/2.dcm"]
    objects = sorted((tmp_path / "exchange").rglob("*"))
    stored = [p for p in objects if p.is_file()]
    assert len(stored) == 3  # the volume and two distinct slices, each under <2 hex>/<sha256>
    assert all(p.name == sha256_file(p) and p.parent.name == p.name[:2] for p in stored)
    mtimes = [p.stat().st_mtime_ns for p in stored]
    assert exchange.pack(volume) == packed_volume and exchange.pack(series) == packed_series
    assert [p.stat().st_mtime_ns for p in stored] == mtimes  # nothing sent twice

    out = tmp_path / "out"
    assert exchange.unpack(packed_volume, out / "v.nii.gz").read_bytes() == volume.read_bytes()
    assert _tree(exchange.unpack(packed_series, out / "series")) == _tree(series)
    cached = exchange.cached(packed_volume[""], "model.pt")
    assert cached.read_bytes() == volume.read_bytes() and cached.name == "model.pt"
    assert exchange.cached(packed_volume[""], "model.pt") == cached


def test_a_missing_or_altered_object_never_lands(tmp_path: Path) -> None:
    exchange = Exchange(str(tmp_path / "exchange"))
    source = tmp_path / "a.bin"
    source.write_bytes(b"original")
    sha = exchange.put_file(source)
    target = tmp_path / "out" / "a.bin"
    target.parent.mkdir()
    target.write_bytes(b"what was there")

    (tmp_path / "exchange" / sha[:2] / sha).write_bytes(b"tampered")
    with pytest.raises(ExchangeError, match=f"object {sha}: holds bytes hashing to"):
        exchange.get_file(sha, target)
    with pytest.raises(ExchangeError, match="not found"):
        exchange.get_file("0" * 64, target)
    assert target.read_bytes() == b"what was there"  # untouched, no temp file left
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    with pytest.raises(FileNotFoundError, match="nothing to hand over"):  # the input's problem, not the storage's
        exchange.pack(tmp_path / "empty_folder_that_does_not_exist")


@pytest.mark.services
def test_the_exchange_on_s3(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    exchange = Exchange(f"s3://{s3_server.bucket}/exchange-test",
                        {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}})
    source = tmp_path / "case.nii.gz"
    source.write_bytes(bytes(range(256)) * 4096)
    packed = exchange.pack(source)
    fs = s3_server.filesystem()
    assert fs.cat(f"{s3_server.bucket}/exchange-test/{packed[''][:2]}/{packed['']}") == source.read_bytes()
    assert exchange.unpack(packed, tmp_path / "back.nii.gz").read_bytes() == source.read_bytes()
