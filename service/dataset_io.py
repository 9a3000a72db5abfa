"""Reading DICOM datasets within bounds: the one place that turns received bytes into a pydicom dataset.

Used by the listener (the header check of every C-STORE, on the network thread) and by decoding, so it imports no
image libraries. Bounds: a file or dataset above ``max_bytes`` is refused before it is read whole; a Deflated
Explicit VR Little Endian dataset (PS3.5 A.5) is inflated incrementally and stopped at the bound (pydicom inflates it
whole, so a 6 MB deflate bomb becomes 6 GB); the header check reads large values lazily and inflates a Deflated
dataset only as far as its header needs.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# Default of the node's ``limits.max_dataset_bytes``, for callers without a configuration.
MAX_DATASET_BYTES = 1 << 30
# How much of a Deflated dataset is inflated to read its header (everything before the pixel data).
HEADER_PREFIX_BYTES = 8 << 20
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class DecodeError(Exception):
    """The input cannot be turned into a grey image; the message says why (it becomes the sidecar's error)."""


def file_size(path: str | os.PathLike[str]) -> int:
    """The size of a film's file, or :class:`DecodeError` when it cannot be one: missing, a folder, or not a regular
    file (a FIFO would block the reader forever, ``/dev/zero`` or ``/dev/urandom`` never end), so nothing is opened
    that reading could stall on."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError("cannot read the file: it is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError("cannot read the file: not a regular file (a FIFO, device or socket), so it is not opened")
    return st.st_size


def read_dataset(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    stop_before_pixels: bool = False,
    max_bytes: int | None = MAX_DATASET_BYTES,
) -> Dataset:
    """Read a DICOM dataset, tolerating files without preamble or file meta (old ACR-NEMA style files).

    A dataset without a Transfer Syntax UID gets the one it was actually read with, so its pixels can be decoded.
    A file or dataset above ``max_bytes`` (as stored, or once inflated) raises :class:`DecodeError` before it is
    read whole.
    """
    if isinstance(source, str | os.PathLike):
        size = file_size(source)
        _check_size(size, max_bytes, "the dataset")
        with open(source, "rb") as fh:
            head = fh.read(1 << 16)
            offset, syntax = file_meta_end(head)
            if syntax != DeflatedExplicitVRLittleEndian and (len(head) == size or offset < len(head) - 8):
                # pydicom reads each value straight from the file: one copy of the pixel data, not two (reading
                # the file into bytes and then each value out of them costs ~5 ms more for a 10 MB film)
                fh.seek(0)
                return _dataset(fh, stop_before_pixels=stop_before_pixels)
            fh.seek(0)
            source = fh.read()
    elif not isinstance(source, bytes | bytearray | memoryview):
        source = source.read()
    data = bytes(source)
    _check_size(len(data), max_bytes, "the dataset")
    offset, syntax = file_meta_end(data)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds = _read_deflated(data, offset, max_bytes, stop_before_pixels=stop_before_pixels)
        return _with_syntax(ds)
    return _dataset(io.BytesIO(data), stop_before_pixels=stop_before_pixels)


def _dataset(fh: BinaryIO, *, stop_before_pixels: bool) -> Dataset:
    try:
        ds = pydicom.dcmread(fh, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types for garbage input
        raise DecodeError(f"not a readable DICOM dataset: {exc}") from exc
    return _with_syntax(ds)


def _with_syntax(ds: Dataset) -> Dataset:
    """``ds``, refused when empty; without a Transfer Syntax UID it gets the one it was actually read with."""
    if len(ds) == 0:
        raise DecodeError("not a DICOM dataset: no elements could be read")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        if ds.original_encoding[1] is False:  # little endian flag of (is_implicit_VR, is_little_endian)
            meta.TransferSyntaxUID = ExplicitVRBigEndian
        elif ds.original_encoding[0]:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def read_header(path: str | os.PathLike[str], prefix_bytes: int = HEADER_PREFIX_BYTES) -> Dataset:
    """The header of a received file (file meta and every element before the pixel data), read in bounded memory:
    large values are not loaded, and a Deflated dataset is inflated only as far as ``prefix_bytes``."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        offset, syntax = file_meta_end(head)
        if syntax != DeflatedExplicitVRLittleEndian:
            fh.seek(0)
            try:
                return pydicom.dcmread(fh, force=True, stop_before_pixels=True, defer_size="1 MB")
            except Exception as exc:
                raise DecodeError(f"not a readable DICOM dataset: {exc}") from exc
        fh.seek(offset)
        inflated = _inflate(fh, prefix_bytes, truncate=True)
    return _dataset_from_inflated(head, offset, inflated, stop_before_pixels=True)


def _check_size(size: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise DecodeError(f"{what} is larger than limits.max_dataset_bytes ({size} > {max_bytes} bytes)")


def file_meta_end(data: bytes) -> tuple[int, str | None]:
    """Where the dataset starts after a Part 10 preamble and file meta, and the meta's Transfer Syntax UID.

    The file meta group is always Explicit VR Little Endian (PS3.10 7.1), so it is walked here without pydicom.
    Returns (0, None) for data without a preamble.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return 0, None
    off, syntax = 132, None
    while off + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, off)
        if group != 2:
            break
        vr = data[off + 4 : off + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if off + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, off + 8)
            start = off + 12
        else:
            (length,) = struct.unpack_from("<H", data, off + 6)
            start = off + 8
        if elem == 0x0010:
            syntax = data[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        off = start + length
    return off, syntax


def _inflate(source: bytes | BinaryIO, limit: int | None, *, truncate: bool = False) -> bytes:
    """Inflate a raw deflate stream (PS3.5 A.5) incrementally: at most ``limit`` bytes come out. Beyond that the
    result is cut there (``truncate``, for reading a header) or :class:`DecodeError` is raised."""
    limit = MAX_DATASET_BYTES if limit is None else limit
    fh = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    while not z.eof:
        chunk = z.unconsumed_tail or fh.read(1 << 20)
        if not chunk:
            break
        try:
            out += z.decompress(chunk, limit + 1 - len(out))
        except zlib.error as exc:
            raise DecodeError(f"the Deflated dataset cannot be inflated: {exc}") from exc
        if len(out) > limit:
            if truncate:
                return bytes(out[:limit])
            raise DecodeError(f"the Deflated dataset inflates to more than limits.max_dataset_bytes ({limit} bytes)")
    return bytes(out)


def _read_deflated(data: bytes, offset: int, max_bytes: int | None, *, stop_before_pixels: bool) -> Dataset:
    return _dataset_from_inflated(data, offset, _inflate(data[offset:], max_bytes),
                                  stop_before_pixels=stop_before_pixels)  # fmt: skip


def _dataset_from_inflated(data: bytes, offset: int, inflated: bytes, *, stop_before_pixels: bool) -> Dataset:
    """A dataset read from inflated bytes, with the file meta read from ``data[132:offset]``."""
    from pydicom.filereader import read_dataset as read_elements

    def at_pixels(tag: Any, vr: Any, length: int) -> bool:
        return int(tag) in _PIXEL_TAGS

    try:
        meta = FileMetaDataset(read_elements(io.BytesIO(data[132:offset]), False, True))
        ds = read_elements(io.BytesIO(inflated), False, True, stop_when=at_pixels if stop_before_pixels else None)
    except Exception as exc:
        raise DecodeError(f"not a readable DICOM dataset (inflated): {exc}") from exc
    ds.file_meta = meta
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


