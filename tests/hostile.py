"""Makers of hostile and broken DICOM films, shared by the limit tests and the fault/fuzz harness.

Every maker is deterministic for a given seed and writes small files (a deflate bomb is small on disk; what it
declares or inflates to is what is large), so the tests never store films in the repository.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"

# What a connection sends before it hangs up without associating: nothing (a port scan, a load balancer's TCP
# probe), an A-ASSOCIATE-RQ header declaring 4 GiB (refused for its length), or a PDU of no known type (garbage).
HANG_UPS = {"probe": b"", "length-bomb": b"\x01\x00\xff\xff\xff\xff", "garbage": b"\x09\x00\x00\x00\x00\x04abcd"}


def hang_up(port: int, data: bytes, source: str = "127.0.0.1") -> None:
    """Connect from ``source``, send ``data``, stop sending and read until the peer closes the connection."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


def small_dataset(rows: int = 64, cols: int = 64, seed: int = 0, ts: str = ExplicitVRLittleEndian) -> Dataset:
    """A valid little DX film (random 12-bit pixels), new UIDs."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = DX, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientAge, ds.StudyDate = "DX", "045Y", "20240102"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4095, (rows, cols)).astype(np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_uid(path: Path) -> str:
    """The SOP Instance UID in a file's meta (readable however broken its dataset is)."""
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def rle_film(seed: int = 0) -> Dataset:
    ds = small_dataset(seed=seed)
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    return ds


def panicking_rle(path: Path, seed: int = 0) -> Path:
    """An RLE film whose segment data make pylibjpeg-rle panic (pyo3 PanicException, a BaseException): byte flips in
    the segments until the decoder panics (found within a few tries for every seed)."""
    from pydicom.pixels import get_decoder  # noqa: F401 - the decoder plugins must be importable

    ds = rle_film(seed)
    frag = bytearray(list(generate_fragments(ds.PixelData))[1])
    rng = random.Random(seed)
    for _ in range(200):
        bad = bytearray(frag)
        for _ in range(5):
            bad[rng.randrange(64, len(bad))] = rng.randrange(256)
        ds.PixelData = encapsulate([bytes(bad)])
        try:
            ds.pixel_array_options(decoding_plugin="pylibjpeg")
            ds.pixel_array  # noqa: B018
        except Exception:
            continue
        except BaseException:  # the panic we are looking for
            return save(ds, path)
    raise AssertionError("no panicking RLE input found")


def j2k_declaring(path: Path, width: int, height: int, *, header_too: bool = False, seed: int = 0) -> Path:
    """A JPEG 2000 film whose codestream SIZ marker declares ``width`` x ``height`` (a decoder would allocate that);
    Rows/Columns say 64x64 unless ``header_too``."""
    ds = small_dataset(seed=seed)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    frag = bytearray(list(generate_fragments(ds.PixelData))[1])
    siz = frag.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", frag, siz + 8, width, height)
    ds.PixelData = encapsulate([bytes(frag)])
    if header_too:
        ds.Rows, ds.Columns = height, width
    return save(ds, path)


def huge_header(path: Path, rows: int = 60000, cols: int = 60000, frames: int | None = None) -> Path:
    """Uncompressed film whose Rows/Columns/NumberOfFrames declare a huge image over a tiny pixel buffer."""
    ds = small_dataset()
    ds.Rows, ds.Columns = rows, cols
    if frames:
        ds.NumberOfFrames = frames
    return save(ds, path)


def deflate_bomb(path: Path, inflated_bytes: int, *, seed: int = 0, meta_padding: int = 0) -> Path:
    """A valid Deflated Explicit VR Little Endian film with a private OB element of ``inflated_bytes`` zero bytes
    before its pixel data: a few hundred kB on disk, ``inflated_bytes`` once inflated (streamed, never in memory).
    ``meta_padding`` bytes lengthen the File Meta Information Version (OB, the one element before the Transfer
    Syntax UID that may be long), pushing the syntax past what a reader looks at first."""
    ds = small_dataset(seed=seed, ts=DeflatedExplicitVRLittleEndian)
    if meta_padding:
        ds.file_meta.FileMetaInformationVersion = b"\x00\x01" + bytes(meta_padding)
    pixels = ds.PixelData
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, Dataset(ds))
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta)
        fh.write(z.compress(body.getvalue()))
        fh.write(z.compress(struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"FILMGATE"))
        fh.write(z.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated_bytes)))
        chunk = bytes(1 << 20)
        left = inflated_bytes
        while left:
            n = min(left, len(chunk))
            fh.write(z.compress(chunk[:n]))
            left -= n
        fh.write(z.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels))
        fh.write(z.flush())
    return path


# ----------------------------------------------------------------------------------------------------- mutations


def with_transfer_syntax(data: bytes, syntax: str) -> bytes:
    """A Part 10 file whose meta claims ``syntax``, the dataset untouched (the meta's group length adjusted)."""
    tag = b"\x02\x00\x10\x00UI"
    i = data.find(tag, 132)
    if i < 0:
        return data
    (old_len,) = struct.unpack_from("<H", data, i + 6)
    value = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")
    out = bytearray(data[:i + 6] + struct.pack("<H", len(value)) + value + data[i + 8 + old_len :])
    g = out.find(b"\x02\x00\x00\x00UL\x04\x00", 132)
    if g >= 0:
        (group_len,) = struct.unpack_from("<I", out, g + 8)
        struct.pack_into("<I", out, g + 8, group_len + len(value) - old_len)
    return bytes(out)


def mutate(data: bytes, rng: random.Random, start: int = 0) -> tuple[str, bytes]:
    """One random mutation of a Part 10 file's dataset (from ``start``, where the file meta ends): byte flips,
    truncation, bad lengths, VR mismatches, inserted bytes; or a transfer syntax in the meta that the dataset does
    not have."""
    kind = rng.choice(["flip", "flip-many", "truncate", "length", "vr", "syntax", "insert"])
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(start, len(buf))] ^= 1 << rng.randrange(8)
    elif kind == "flip-many":
        for _ in range(rng.randint(10, 200)):
            buf[rng.randrange(start, len(buf))] = rng.randrange(256)
    elif kind == "truncate":
        del buf[rng.randrange(start + 1, len(buf)) :]
    elif kind == "length":  # overwrite a 16- or 32-bit length field somewhere after the meta with a wild value
        pos = rng.randrange(start, max(start + 1, len(buf) - 4))
        struct.pack_into("<I", buf, pos, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFF0, rng.randrange(1 << 32)]))
    elif kind == "vr":  # replace a VR with another
        vrs = [b"OB", b"OW", b"SQ", b"UN", b"US", b"UL", b"UI", b"DS", b"AE", b"??"]
        head = bytes(buf[start : start + 4096])  # the elements before the pixel data
        spots = [start + i for i in range(len(head) - 2) if head[i : i + 2] in vrs[:-1]]
        if spots:
            i = rng.choice(spots)
            buf[i : i + 2] = rng.choice(vrs)
    elif kind == "syntax":  # claim another transfer syntax in the meta than the dataset is encoded in
        new = rng.choice([ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                          JPEG2000Lossless, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.3.4"])  # fmt: skip
        buf = bytearray(with_transfer_syntax(bytes(buf), new))
    else:
        pos = rng.randrange(start, len(buf))
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return kind, bytes(buf)
