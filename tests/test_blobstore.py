"""Blob store contract on both backends (filesystem and S3 over real HTTP), then each backend's
own promises: no partial files, pruned directories and free-space checks for the filesystem,
objects with the DICOM media type for S3."""

from __future__ import annotations

import io
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from minio import Minio

from archive.blobstore import (
    BlobNotFound,
    BlobStoreError,
    FileBlobStore,
    OutOfSpace,
    S3BlobStore,
    instance_key,
    open_blob_store,
)
from tests.conftest import Backend

INVALID_KEYS = ["../x", "/abs", "a//b", "", "a/./b", "studies/../../escape.dcm", "trailing/"]


@pytest.fixture
def store(storage_backend: Backend) -> FileBlobStore | S3BlobStore:
    return open_blob_store(storage_backend.settings)


def _key(study: str = "1.2.3", series: str = "1.2.3.4", sop: str | None = None) -> str:
    return instance_key(study, series, sop or f"1.2.3.4.{uuid.uuid4().int % 10**12}")


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(FileBlobStore.TMP_SUFFIX)]


# --- the contract, on both backends -----------------------------------------------------------


def test_backend_matches_settings(storage_backend: Backend, store):
    expected = FileBlobStore if storage_backend.storage == "file" else S3BlobStore
    assert type(store) is expected
    assert store.healthy()
    if storage_backend.storage == "file":
        assert store.url == (storage_backend.settings.data_dir / "blobs").resolve().as_uri()
    else:
        assert store.url == f"{storage_backend.settings.storage_url}/"


def test_put_read_open_roundtrip(store):
    key = _key()
    data = os.urandom(10_000)

    store.put(key, data)

    assert store.read(key) == data
    chunks = list(store.open(key, chunk_size=1024))
    assert b"".join(chunks) == data
    assert len(chunks) >= 10
    assert max(len(c) for c in chunks) <= 1024
    assert store.size(key) == len(data)
    assert store.exists(key)


def test_empty_blob_roundtrip(store):
    key = _key()
    store.put(key, b"")
    assert store.exists(key)
    assert store.size(key) == 0
    assert store.read(key) == b""
    assert b"".join(store.open(key, chunk_size=16)) == b""


def test_large_blob_streams_in_chunks(store):
    # Just over 5 MiB: on S3 this is a multipart upload in the minio client.
    key = _key()
    data = os.urandom(5 * 2**20 + 4321)

    store.put(key, data)

    assert store.size(key) == len(data)
    chunks = list(store.open(key, chunk_size=2**20))
    assert len(chunks) >= 6
    assert max(len(c) for c in chunks) <= 2**20
    assert b"".join(chunks) == data
    assert store.read(key) == data


def test_delete_removes_blob_and_missing_delete_is_not_an_error(store):
    keep, gone = _key(), _key()
    store.put(keep, b"keep")
    store.put(gone, b"gone")

    store.delete(gone)

    assert not store.exists(gone)
    with pytest.raises(BlobNotFound):
        store.read(gone)
    assert store.read(keep) == b"keep"
    store.delete(gone)  # already gone
    store.delete(_key(study="9.9.9"))  # never existed, not even its directory
    assert set(store.keys()) == {keep}


def test_keys_lists_exactly_what_was_put(store):
    a1 = instance_key("1.2.3", "1.2.3.1", "1.2.3.1.1")
    a2 = instance_key("1.2.3", "1.2.3.2", "1.2.3.2.1")
    b1 = instance_key("1.2.34", "1.2.34.1", "1.2.34.1.1")
    other = "other/thing.bin"
    assert list(store.keys()) == []
    for key in (a1, a2, b1, other):
        store.put(key, key.encode())

    assert sorted(store.keys()) == sorted([a1, a2, b1, other])
    assert sorted(store.keys("studies/")) == sorted([a1, a2, b1])
    assert sorted(store.keys("studies/1.2.3/")) == sorted([a1, a2])
    assert list(store.keys("studies/1.2.3/series/1.2.3.2/")) == [a2]
    assert list(store.keys("studies/7.7.7/")) == []
    assert list(store.keys("nothing-here/")) == []

    store.delete(a1)
    assert sorted(store.keys("studies/")) == sorted([a2, b1])


def test_keys_prefix_matches_like_a_string_prefix(request: pytest.FixtureRequest, store):
    a = instance_key("1.2.3", "1.2.3.1", "1.2.3.1.1")
    b = instance_key("1.2.34", "1.2.34.1", "1.2.34.1.1")
    store.put(a, b"a")
    store.put(b, b"b")

    assert sorted(store.keys("studies/1.2.3")) == sorted([a, b])
    assert list(store.keys(a)) == [a]


def test_keys_prefix_cannot_escape_the_store(request: pytest.FixtureRequest, store):
    store.put(_key(), b"x")
    for prefix in ("../", "/"):
        try:
            listed = list(store.keys(prefix))
        except BlobStoreError:
            listed = []
        assert listed == [], prefix


def test_overwrite_returns_new_content(store):
    key = _key()
    store.put(key, b"old content, longer than the new one")
    store.put(key, b"new")

    assert store.read(key) == b"new"
    assert b"".join(store.open(key, chunk_size=2)) == b"new"
    assert store.size(key) == 3
    assert list(store.keys()) == [key]


def test_concurrent_readers_see_old_or_new_never_partial(store):
    key = _key()
    old, new = b"A" * 300_000, b"B" * 200_000
    store.put(key, old)
    seen: set[bytes] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(store.read(key))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            store.put(key, new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join(10)
    assert errors == []
    assert seen <= {old, new}
    assert seen  # the reader did read
    assert store.read(key) == old


@pytest.mark.parametrize("op", ["read", "open", "size"])
def test_missing_key_raises_blob_not_found(store, op: str):
    key = _key()
    with pytest.raises(BlobNotFound) as info:
        getattr(store, op)(key)
    assert isinstance(info.value, BlobStoreError)
    assert isinstance(info.value, KeyError)
    assert not store.exists(key)


def test_a_key_prefix_is_not_a_blob(request: pytest.FixtureRequest, store):
    store.put(instance_key("1.2.3", "1.2.3.1", "1.2.3.1.1"), b"x")
    prefix_key = "studies/1.2.3/series/1.2.3.1"
    assert not store.exists(prefix_key)
    with pytest.raises(BlobNotFound):
        store.read(prefix_key)
    with pytest.raises(BlobNotFound):
        store.open(prefix_key)
    with pytest.raises(BlobNotFound):
        store.size(prefix_key)
    store.delete(prefix_key)
    assert store.read(instance_key("1.2.3", "1.2.3.1", "1.2.3.1.1")) == b"x"


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_refused(storage_backend: Backend, store, key: str):
    operations = {
        "put": lambda: store.put(key, b"escape"),
        "read": lambda: store.read(key),
        "open": lambda: store.open(key),
        "size": lambda: store.size(key),
        "exists": lambda: store.exists(key),
        "delete": lambda: store.delete(key),
    }
    for name, call in operations.items():
        try:
            call()
        except BlobStoreError as exc:
            assert "invalid blob key" in str(exc), name
        else:
            pytest.fail(f"{name}({key!r}) was not refused")
    # Nothing was written anywhere: not in the store, not next to it, not at an absolute path.
    assert list(store.keys()) == []
    data_dir = storage_backend.settings.data_dir
    assert not (data_dir / "x").exists()
    assert not (data_dir / "escape.dcm").exists()
    assert not Path("/abs").exists()


def test_put_if_absent_stores_once_and_never_replaces(store):
    """The write ingest uses under the duplicate policy keep: the first bytes stay, whoever
    writes the key next (this process or another) is told so."""
    key = _key()
    assert store.put_if_absent(key, b"first copy") is True
    assert store.put_if_absent(key, b"second copy, other bytes") is False
    assert store.put_if_absent(key, b"first copy") is False
    assert store.read(key) == b"first copy"
    assert list(store.keys()) == [key]
    store.delete(key)
    assert store.put_if_absent(key, b"after a delete") is True
    assert store.read(key) == b"after a delete"


# --- filesystem backend -----------------------------------------------------------------------


@pytest.fixture
def file_store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def test_file_put_leaves_no_partial_files(file_store: FileBlobStore):
    keys = [_key(series=f"1.2.3.{i}") for i in range(5)]
    for key in keys:
        file_store.put(key, os.urandom(2048))
        file_store.put(key, os.urandom(1024))  # overwrite too

    assert _partials(file_store.root) == []
    files = sorted(
        p.relative_to(file_store.root).as_posix() for p in file_store.root.rglob("*.dcm")
    )
    assert files == sorted(keys)


def test_file_put_if_absent_of_many_writers_at_once(file_store: FileBlobStore):
    """Writers racing for one key: exactly one stores its bytes, whole; no temporary file is
    left behind (the link of a finished file either makes the name or fails)."""
    key = _key()
    payloads = [os.urandom(256 * 1024) for _ in range(8)]
    barrier = threading.Barrier(len(payloads))
    won: list[bytes] = []

    def writer(data: bytes) -> None:
        barrier.wait()
        if file_store.put_if_absent(key, data):
            won.append(data)

    threads = [threading.Thread(target=writer, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert file_store.read(key) == won[0]
    assert _partials(file_store.root) == []


def test_file_failed_put_leaves_no_partial_and_raises_blob_store_error(file_store: FileBlobStore):
    blocker = "studies/1.2.3/series/1.2.3.4"
    file_store.put(blocker, b"a file where a directory is needed")

    with pytest.raises(BlobStoreError, match="cannot write"):
        file_store.put(blocker + "/1.2.3.4.5.dcm", b"data")

    assert _partials(file_store.root) == []
    assert file_store.read(blocker) == b"a file where a directory is needed"


def test_file_remove_partials_removes_planted_leftovers(file_store: FileBlobStore):
    key = _key()
    file_store.put(key, b"real blob")
    series_dir = (file_store.root / key).parent
    leftover = series_dir / f".x.dcm.{uuid.uuid4().hex}{FileBlobStore.TMP_SUFFIX}"
    leftover.write_bytes(b"half a file")
    deep = file_store.root / "studies" / "9.9" / "series" / "9.9.1"
    deep.mkdir(parents=True)
    leftover2 = deep / f".y.dcm.{uuid.uuid4().hex}{FileBlobStore.TMP_SUFFIX}"
    leftover2.write_bytes(b"")
    lookalike = series_dir / "not-hidden.partial"  # not one of ours: not a temp file name
    lookalike.write_bytes(b"keep")

    assert sorted(file_store.keys()) == sorted(
        [key, lookalike.relative_to(file_store.root).as_posix()]
    )
    assert file_store.remove_partials() == 2

    assert not leftover.exists()
    assert not leftover2.exists()
    assert lookalike.read_bytes() == b"keep"
    assert file_store.read(key) == b"real blob"
    assert file_store.remove_partials() == 0


def test_file_delete_prunes_empty_directories(file_store: FileBlobStore):
    a = instance_key("1.2.3", "1.2.3.1", "1.2.3.1.1")
    b = instance_key("1.2.3", "1.2.3.1", "1.2.3.1.2")
    c = instance_key("1.2.3", "1.2.3.2", "1.2.3.2.1")
    for key in (a, b, c):
        file_store.put(key, b"x")
    root = file_store.root

    file_store.delete(a)
    assert (root / b).parent.is_dir()  # the series still holds b

    file_store.delete(b)
    assert not (root / "studies/1.2.3/series/1.2.3.1").exists()
    assert (root / "studies/1.2.3/series/1.2.3.2").is_dir()

    file_store.delete(c)
    assert root.is_dir()
    assert list(root.iterdir()) == []  # studies/ went too, the root stays
    assert file_store.healthy()


def test_file_check_space(tmp_path: Path):
    root = tmp_path / "blobs"
    free = shutil.disk_usage(tmp_path).free

    starved = FileBlobStore(root, min_free_bytes=free + 2**40)
    with pytest.raises(OutOfSpace, match="MiB minimum"):
        starved.check_space(1)
    assert isinstance(OutOfSpace("x"), BlobStoreError)

    roomy = FileBlobStore(root, min_free_bytes=2**20)
    roomy.check_space(1024)
    with pytest.raises(OutOfSpace):
        roomy.check_space(free)  # the blob itself would eat the reserve

    FileBlobStore(root).check_space(10 * free)  # min_free_bytes=0: no check


def test_file_open_blob_store_applies_settings(make_backend):
    backend = make_backend("sqlite", "file", min_free_disk_mb=7, storage_fsync=False)
    store = open_blob_store(backend.settings)
    assert isinstance(store, FileBlobStore)
    assert store.min_free_bytes == 7 * 2**20
    assert store.fsync is False
    assert store.root == (backend.settings.data_dir / "blobs").resolve()

    huge = make_backend("sqlite", "file", min_free_disk_mb=2**40)
    with pytest.raises(OutOfSpace):
        open_blob_store(huge.settings).check_space(1)


# --- S3 backend -------------------------------------------------------------------------------


@pytest.fixture
def s3_backend(make_backend) -> Backend:
    return make_backend("sqlite", "s3")


def _client(backend: Backend) -> Minio:
    s = backend.settings
    assert s.s3_endpoint is not None
    return Minio(
        s.s3_endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key, secure=False
    )


def _objects(client: Minio, bucket: str) -> Iterator[str]:
    for obj in client.list_objects(bucket, recursive=True):
        yield obj.object_name or ""


@pytest.mark.parametrize("size", [1000, 5 * 2**20 + 1], ids=["small", "multipart"])
def test_s3_object_lands_in_bucket_as_application_dicom(s3_backend: Backend, size: int):
    store = open_blob_store(s3_backend.settings)
    bucket = urlparse(s3_backend.settings.resolved_storage_url).netloc
    key = _key()
    data = os.urandom(size)

    store.put(key, data)

    client = _client(s3_backend)
    assert client.bucket_exists(bucket)
    stat = client.stat_object(bucket, key)
    assert stat.content_type == "application/dicom"
    assert stat.size == size
    response = client.get_object(bucket, key)
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()
    assert list(_objects(client, bucket)) == [key]

    store.delete(key)
    assert list(_objects(client, bucket)) == []


def test_s3_put_if_absent_is_one_conditional_put(s3_backend: Backend):
    """``If-None-Match: *`` goes to the server as the condition, not as user metadata; the
    object is application/dicom, as put() writes it."""
    store = open_blob_store(s3_backend.settings)
    bucket = urlparse(s3_backend.settings.resolved_storage_url).netloc
    key = _key()
    assert store.put_if_absent(key, b"once")
    stat = _client(s3_backend).stat_object(bucket, key)
    assert stat.content_type == "application/dicom"
    assert not any("none-match" in name.lower() for name in (stat.metadata or {}))
    assert not store.put_if_absent(key, b"twice")
    assert store.read(key) == b"once"


def test_s3_prefix_in_storage_url(make_backend):
    bucket = f"pb-{uuid.uuid4().hex[:12]}"
    backend = make_backend("sqlite", "s3", storage_url=f"s3://{bucket}/archive/v1/")
    store = open_blob_store(backend.settings)
    key = _key()

    store.put(key, b"prefixed")

    assert store.url == f"s3://{bucket}/archive/v1/"
    assert list(_objects(_client(backend), bucket)) == [f"archive/v1/{key}"]
    assert list(store.keys()) == [key]
    assert list(store.keys("studies/")) == [key]
    assert store.read(key) == b"prefixed"


def test_s3_sees_objects_written_by_another_client(s3_backend: Backend):
    store = open_blob_store(s3_backend.settings)
    bucket = urlparse(s3_backend.settings.resolved_storage_url).netloc
    key = _key()
    _client(s3_backend).put_object(bucket, key, io.BytesIO(b"from outside"), length=12)

    assert store.exists(key)
    assert store.size(key) == 12
    assert store.read(key) == b"from outside"
    assert list(store.keys()) == [key]
