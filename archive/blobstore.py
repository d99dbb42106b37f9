"""Blob store: the bytes of every instance exactly as received.

Two backends behind one interface: a filesystem tree (embedded default) and S3/MinIO through the
``minio`` client. Keys look like ``studies/{study}/series/{series}/{sop}.dcm``. Reads stream in
large chunks so that nothing ever holds a whole study in memory.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlparse

from config import Settings

if TYPE_CHECKING:
    from minio.helpers import DictType

CHUNK_SIZE = 1024 * 1024
#: The largest object S3 takes in one PutObject request.
_S3_SINGLE_PUT_LIMIT = 5 * 2**30


class BlobStoreError(Exception):
    """The store could not complete an operation."""


class BlobNotFound(BlobStoreError, KeyError):
    pass


class OutOfSpace(BlobStoreError):
    """No room left to store a blob (DIMSE 0xA700, HTTP 507)."""


class BlobStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` durably and atomically (readers see old or new)."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` as :meth:`put` does, unless a blob is there already:
        then leave it as it is and return False. Of several writers of one key, at once or
        one after another, exactly one stores its bytes (on any one store)."""

    def open(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the blob in chunks."""

    def read(self, key: str) -> bytes: ...

    def local_path(self, key: str) -> Path | None:
        """The blob's file when the store keeps blobs as local files (to stream it to a socket
        without copying); ``None`` for stores that do not."""

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix`` (a plain string prefix, as in S3)."""

    def check_space(self, needed: int) -> None:
        """Raise :class:`OutOfSpace` when ``needed`` bytes would not fit."""

    def healthy(self) -> bool: ...


def instance_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"studies/{study_uid}/series/{series_uid}/{sop_uid}.dcm"


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: a key, a key's beginning, or a folder ending in ``/``."""
    if prefix:
        _validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _validate_key(key: str) -> str:
    # Keys come from UIDs we validated, but never let one escape the store's root.
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BlobStoreError(f"invalid blob key {key!r}")
    return key


class FileBlobStore:
    """Blobs as files under a root directory.

    ``put`` writes a temporary file next to the target, optionally fsyncs it, renames it into
    place and fsyncs the directory: after ``put`` returns the blob survives a power loss
    (with ``fsync``) and no reader ever sees half a file.
    """

    TMP_SUFFIX = ".partial"

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _validate_key(key)

    def put(self, key: str, data: bytes) -> None:
        self._put(key, data, replace=True)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """As :meth:`put`, but the finished temporary file is hard-linked to the key's name,
        which fails when the name exists (link(2) never replaces): no check-then-write gap
        between processes, and no reader ever sees half a file."""
        return self._put(key, data, replace=False)

    def _put(self, key: str, data: bytes, *, replace: bool) -> bool:
        # Plain strings and os calls: for a small instance pathlib's objects cost as much as
        # the write itself.
        path = os.path.join(self._root, _validate_key(key))
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{self.TMP_SUFFIX}")
        written_to_tmp = False
        try:
            try:
                fd = self._create(folder, tmp)
                written_to_tmp = True
                try:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    if self.fsync:
                        os.fdatasync(fd)  # data and size; the rename is made durable below
                finally:
                    os.close(fd)
                if replace:
                    os.replace(tmp, path)
                    written_to_tmp = False
                elif not self._link(tmp, path):
                    return False
                if self.fsync:
                    dfd = os.open(folder, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutOfSpace(f"no space left in {self.root}") from exc
                raise BlobStoreError(f"cannot write {key}: {exc}") from exc
        finally:
            if written_to_tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return True

    @staticmethod
    def _link(tmp: str, path: str) -> bool:
        """Give the written ``tmp`` the name ``path`` unless it exists; whether it did. On a
        filesystem without hard links, a check and a rename (not atomic between processes)."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(path):
                return False
            os.replace(tmp, path)
        return True

    @staticmethod
    def _create(folder: str, tmp: str) -> int:
        """Create ``tmp`` in ``folder``, creating the folder when it is missing."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            return os.open(tmp, flags, 0o644)

    def open(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc
        return _iter_file(fh, chunk_size)

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Prune empty series/study directories, never the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def keys(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)
        # Walk from the deepest folder the prefix names, then match it as a string prefix.
        folder = prefix.rpartition("/")[0]
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(".") and name.endswith(self.TMP_SUFFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def remove_partials(self) -> int:
        """Delete temporary files a killed process left behind; return how many."""
        count = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and name.endswith(self.TMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        Path(dirpath, name).unlink()
                        count += 1
        return count

    def check_space(self, needed: int) -> None:
        if not self.min_free_bytes:
            return
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise OutOfSpace(
                f"{free // 2**20} MiB free in {self.root}, "
                f"below the {self.min_free_bytes // 2**20} MiB minimum"
            )

    def healthy(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


def _iter_file(fh: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(chunk_size):
            yield chunk


class S3BlobStore:
    """Blobs as objects in an S3 bucket (MinIO, AWS, any S3 server), via the ``minio`` client.

    S3 PUT is atomic and durable once acknowledged, so ``put`` is a single ``put_object``.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool = True,
        region: str | None = None,
    ) -> None:
        from minio import Minio

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
        )
        from minio.error import S3Error

        self._s3_error = S3Error
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise BlobStoreError(f"cannot use bucket {bucket}: {exc}") from exc

    def _name(self, key: str) -> str:
        return self.prefix + _validate_key(key)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(
                self.bucket,
                self._name(key),
                io.BytesIO(data),
                length=len(data),
                content_type="application/dicom",
            )
        except self._s3_error as exc:
            if exc.code in ("EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"):
                raise OutOfSpace(f"the S3 store refused {key}: {exc.code}") from exc
            raise BlobStoreError(f"cannot write {key}: {exc}") from exc
        except Exception as exc:  # network errors from urllib3
            raise BlobStoreError(f"cannot write {key}: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """One conditional PutObject, ``If-None-Match: *`` (S3 conditional writes; MinIO and
        moto honour it): the server stores the object only when the key is free, else answers
        412. Objects over 5 GiB, which S3 takes only in parts, are checked first and then put
        (not atomic between processes)."""
        if len(data) > _S3_SINGLE_PUT_LIMIT:
            if self.exists(key):
                return False
            self.put(key, data)
            return True
        name = self._name(key)
        headers: DictType = {"Content-Type": "application/dicom", "If-None-Match": "*"}
        for _attempt in range(3):
            try:
                # put_object() would send If-None-Match as user metadata (x-amz-meta-…); its
                # single-part request takes the headers as given.
                self.client._put_object(self.bucket, name, data, headers)
            except self._s3_error as exc:
                if exc.code == "PreconditionFailed":
                    return False
                if exc.code == "ConditionalRequestConflict":
                    continue  # another conditional write to the key is in flight: ask again
                if exc.code in ("EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"):
                    raise OutOfSpace(f"the S3 store refused {key}: {exc.code}") from exc
                raise BlobStoreError(f"cannot write {key}: {exc}") from exc
            except Exception as exc:  # network errors from urllib3
                raise BlobStoreError(f"cannot write {key}: {exc}") from exc
            return True
        raise BlobStoreError(f"cannot write {key}: concurrent conditional writes conflicted")

    def open(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            response = self.client.get_object(self.bucket, self._name(key))
        except self._s3_error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise BlobNotFound(key) from exc
            raise BlobStoreError(f"cannot read {key}: {exc}") from exc
        return self._stream(response, chunk_size)

    @staticmethod
    def _stream(response: object, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from response.stream(chunk_size)  # type: ignore[attr-defined]
        finally:
            response.close()  # type: ignore[attr-defined]
            response.release_conn()  # type: ignore[attr-defined]

    def read(self, key: str) -> bytes:
        return b"".join(self.open(key))

    def local_path(self, key: str) -> Path | None:
        return None

    def size(self, key: str) -> int:
        try:
            return int(self.client.stat_object(self.bucket, self._name(key)).size or 0)
        except self._s3_error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                raise BlobNotFound(key) from exc
            raise BlobStoreError(f"cannot stat {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._name(key))
        except self._s3_error as exc:
            if exc.code not in ("NoSuchKey", "NoSuchObject"):
                raise BlobStoreError(f"cannot delete {key}: {exc}") from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        _validate_prefix(prefix)
        for obj in self.client.list_objects(
            self.bucket, prefix=self.prefix + prefix, recursive=True
        ):
            name = obj.object_name or ""
            yield name[len(self.prefix) :]

    def check_space(self, needed: int) -> None:
        # S3 servers report capacity problems on PUT; nothing to check up front.
        return None

    def healthy(self) -> bool:
        try:
            return bool(self.client.bucket_exists(self.bucket))
        except Exception:
            return False


def open_blob_store(settings: Settings) -> FileBlobStore | S3BlobStore:
    url = settings.resolved_storage_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileBlobStore(
            Path(parsed.path),
            fsync=settings.storage_fsync,
            min_free_bytes=settings.min_free_disk_mb * 2**20,
        )
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"PACSBRIDGE_STORAGE_URL {url!r} names no bucket (s3://bucket)")
        if not settings.s3_endpoint:
            raise ValueError("an s3:// storage URL needs PACSBRIDGE_S3_ENDPOINT (host:port)")
        endpoint = settings.s3_endpoint
        secure = settings.s3_secure
        if "://" in endpoint:  # accept http://host:port too
            ep = urlparse(endpoint)
            endpoint = ep.netloc
            secure = ep.scheme == "https"
        return S3BlobStore(
            parsed.netloc,
            prefix=parsed.path,
            endpoint=endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=secure,
            region=settings.s3_region,
        )
    raise ValueError(f"PACSBRIDGE_STORAGE_URL {url!r}: use file:///path or s3://bucket")
