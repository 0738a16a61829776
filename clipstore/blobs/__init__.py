"""Blob stores: where sealed clip objects live. A backend is chosen once, in config."""

from clipstore.blobs._file import FileBlobStore
from clipstore.blobs._s3 import S3BlobStore
from clipstore.blobs.protocol import BlobNotFound, BlobStore, BlobUnavailable

__all__ = ["BlobNotFound", "BlobStore", "BlobUnavailable", "FileBlobStore", "S3BlobStore"]
