"""Fast first-frame decoders for compressed transfer syntaxes, at the resolution the detectors need.

The gate reduces every film to a long side of at most ``DETECTOR_MAX_SIDE`` (512 px) before the grayscale pipeline;
decoding a 2000 px JPEG 2000 film in full to throw away 15 of every 16 pixels costs 100-1000 ms. Where a syntax can
decode at a reduced resolution, this module asks for the coarsest level that still gives at least the size the
reduce step brings the film to (the reduce step then finishes the job, see :func:`filmgate.decode.reduce_step`):

* JPEG 2000 (lossless and lossy): OpenJPEG's resolution reduction (``glymur``, Debian ``libopenjp2-7``), 2^r levels;
* HTJ2K: OpenJPH's reduced-resolution decode (``imagecodecs.htj2k_decode(skipres=r)``);
* JPEG baseline (8 bit): libjpeg-turbo's DCT scaling (``simplejpeg``: 1/2, 1/4, 1/8 and the eighths between).

Syntaxes that cannot decode reduced get the fastest well-kept decoder measured here (``bench/decode``): libjpeg-turbo
3 (``imagecodecs.jpeg8_decode``) for JPEG lossless and 12-bit JPEG extended, CharLS (``imagecodecs.jpegls_decode``)
for JPEG-LS, imagecodecs' DICOM RLE decoder for RLE (byte planes straight into stored values, where pydicom's
``pixel_array`` with pylibjpeg-rle took 2-3x as long). Everything else (and any film whose parameters a fast decoder
does not cover exactly: colour JPEG without YCbCr, signedness or precision the codestream disagrees on) returns None
and goes through pydicom.

Decoders are registered by transfer syntax UID in :data:`DECODERS`. They return stored values (or luminance for
colour films), never modality or VOI values: those remain the decode module's pure steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from pydicom.dataset import Dataset

# Transfer syntax UIDs (pydicom.uid has them, spelled out here so the registry reads as a table).
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


@dataclass(frozen=True)
class Frame:
    """What a decoder gets: the first frame's codestream and the header facts it must agree with."""

    data: bytes
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    target: tuple[int, int] | None  # (rows, columns) the reduce step will bring the film to; None: full size


Decoder = Callable[[Frame], "np.ndarray | None"]
DECODERS: dict[str, tuple[str, Decoder]] = {}


def register(name: str, *uids: str) -> Callable[[Decoder], Decoder]:
    def add(fn: Decoder) -> Decoder:
        for uid in uids:
            DECODERS[uid] = (name, fn)
        return fn

    return add


def decoder_name(uid: str) -> str | None:
    """The name of the fast decoder for a transfer syntax (for benchmarks and the decode steps), or None."""
    entry = DECODERS.get(str(uid))
    return entry[0] if entry and _available(entry[0]) else None


def decode_first_frame(ds: Dataset, target: tuple[int, int] | None) -> tuple[np.ndarray, str] | None:
    """Decode frame 0 of ``ds`` with the registered fast decoder: (array, decoder name), or None for pydicom.

    The array is 2-D stored values (luminance for colour films) of at least ``target`` size, possibly smaller than
    Rows x Columns when the codestream was decoded at a reduced resolution. A fast decoder that fails returns None
    too: pydicom then decodes the film in full and reports its own error if the data really are broken.
    """
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    entry = DECODERS.get(uid)
    if entry is None or not _available(entry[0]):
        return None
    try:
        frame = _first_frame(ds, target)
        if frame is None:
            return None
        arr = entry[1](frame)
    except Exception:  # a fast path that trips over odd data leaves the film to pydicom
        return None
    if arr is None or arr.ndim != 2:
        return None
    if target is not None and (arr.shape[0] < target[0] or arr.shape[1] < target[1]):
        return None
    if target is None and arr.shape != (frame.rows, frame.columns):
        return None
    return arr, entry[0]


def _first_frame(ds: Dataset, target: tuple[int, int] | None) -> Frame | None:
    from pydicom.encaps import get_frame

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        data = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    return Frame(bytes(data), rows, cols, samples, allocated, stored, signed, photometric, target)


@cache
def _available(name: str) -> bool:
    """Whether a decoder's library (and, for glymur, OpenJPEG >= 2.5 with HTJ2K support) is installed."""
    try:
        if name == "openjpeg-reduce":
            import glymur

            return tuple(int(p) for p in glymur.version.openjpeg_version.split(".")[:2]) >= (2, 5)
        if name == "simplejpeg-scale":
            import simplejpeg  # noqa: F401
        else:
            import imagecodecs  # noqa: F401
        return True
    except Exception:
        return False


def _levels(frame: Frame, limit: int = 8) -> int:
    """The coarsest power-of-two reduction r with ceil(size / 2^r) still at least the target on both sides."""
    if frame.target is None:
        return 0
    r = 0
    while r < limit:
        nxt = r + 1
        if -(-frame.rows // (1 << nxt)) < frame.target[0] or -(-frame.columns // (1 << nxt)) < frame.target[1]:
            break
        r = nxt
    return r


def mask_unused_bits(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Unsigned stored values with the bits above Bits Stored cleared (an overlay or junk may live there, PS3.5
    8.1.1), as pydicom does; the array comes back as it is (no copy) when no value has such a bit, the common case."""
    if arr.dtype.kind != "u" or bits_stored >= arr.dtype.itemsize * 8 or not int(arr.max()) >> bits_stored:
        return arr
    return arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)


def grey_dtype(allocated: int, stored: int, signed: bool) -> np.dtype | None:
    """The little-endian dtype of grey stored values filmgate reads itself, or None for what pydicom must do:
    allocations other than 8 and 16 bits, Bits Stored outside them, signed values narrower than their allocation
    (pydicom sign-extends them)."""
    if allocated not in (8, 16) or not 1 <= stored <= allocated or (signed and stored != allocated):
        return None
    return np.dtype(("<i" if signed else "<u") + str(allocated // 8))


def grey_values(data: bytes | bytearray, rows: int, columns: int, dtype: np.dtype, stored: int) -> np.ndarray | None:
    """One grey frame of ``dtype`` (:func:`grey_dtype`) as a view on ``data``, bits above Bits Stored masked; None
    when ``data`` is shorter than the frame. Shared by the uncompressed path (:mod:`filmgate.decode`) and the RLE
    decoder, whose output has the same layout."""
    count = rows * columns
    if len(data) < count * dtype.itemsize:
        return None
    return mask_unused_bits(np.frombuffer(data, dtype=dtype, count=count).reshape(rows, columns), stored)


def _grey(arr: np.ndarray, frame: Frame) -> np.ndarray | None:
    """Checks a decoded array against the header; colour becomes luminance (the same weights as decode.py)."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 3 and frame.samples == 3:
        rgb = arr.astype(np.float32)
        return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if arr.ndim != 2 or frame.samples != 1:
        return None
    if (arr.dtype.kind == "i") != frame.signed or arr.dtype.itemsize * 8 > max(frame.bits_allocated, 8):
        return None  # the codestream disagrees with the header: pydicom knows how to reconcile them
    return arr


# ------------------------------------------------------------------------------------------- reduced resolution


@register("openjpeg-reduce", J2K_LOSSLESS, J2K)
def _jpeg2000(frame: Frame) -> np.ndarray | None:
    """OpenJPEG decodes only the wavelet levels it needs; glymur reads paths, so the codestream goes in a memfd."""
    import glymur

    levels = _levels(frame)
    if frame.samples not in (1, 3) or frame.photometric not in _J2K_PHOTOMETRIC:
        return None
    fd = os.memfd_create("filmgate-j2k", os.MFD_CLOEXEC)
    try:
        os.write(fd, frame.data)
        step = 1 << levels
        arr = glymur.Jp2k(f"/proc/self/fd/{fd}")[::step, ::step]
    finally:
        os.close(fd)
    return _in_range(_grey(np.asarray(arr), frame), frame)


_J2K_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_ICT", "YBR_RCT")


@register("openjph-reduce", HTJ2K_LOSSLESS, HTJ2K_RPCL, HTJ2K)
def _htj2k(frame: Frame) -> np.ndarray | None:
    import imagecodecs

    if frame.samples != 1:
        return None  # colour HTJ2K: OpenJPH leaves the component transform to the caller; pydicom does it
    return _in_range(_grey(imagecodecs.htj2k_decode(frame.data, skipres=_levels(frame)), frame), frame)


def _in_range(arr: np.ndarray | None, frame: Frame) -> np.ndarray | None:
    """Clip a reduced-resolution decode to the stored range. The low-pass band of a level overshoots a little at
    sharp edges (collimator blades, markers), and OpenJPH writes a slightly negative value of an unsigned film as
    65535: read as signed, such values become 0 instead of white."""
    if arr is None or arr.dtype.kind not in "ui" or frame.samples != 1:
        return arr
    bits = min(frame.bits_stored, arr.dtype.itemsize * 8)
    if frame.signed:
        return np.clip(arr, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if bits >= arr.dtype.itemsize * 8:
        return arr  # the whole type is the stored range: nothing to tell an overshoot by
    signed = arr.view(np.dtype(f"i{arr.dtype.itemsize}"))
    return np.clip(signed, 0, (1 << bits) - 1).astype(arr.dtype)


@register("simplejpeg-scale", JPEG_BASELINE)
def _jpeg_baseline(frame: Frame) -> np.ndarray | None:
    """libjpeg-turbo's DCT scaling; grey out of YCbCr is its Y channel, the luminance of the RGB pydicom makes."""
    import simplejpeg

    if frame.bits_stored > 8 or frame.photometric not in ("MONOCHROME1", "MONOCHROME2", "YBR_FULL", "YBR_FULL_422"):
        return None  # RGB JPEG without a colour transform: libjpeg would guess YCbCr, pydicom knows better
    h, w = frame.target if frame.target is not None else (frame.rows, frame.columns)
    arr = simplejpeg.decode_jpeg(frame.data, colorspace="GRAY", min_height=h, min_width=w)
    return arr[..., 0] if arr.ndim == 3 else arr


# ------------------------------------------------------------------------------------------- full resolution, faster


@register("libjpeg-turbo", JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1)
def _jpeg_turbo(frame: Frame) -> np.ndarray | None:
    """libjpeg-turbo 3 decodes lossless (all predictors) and 12-bit JPEG: 4-6x pylibjpeg-libjpeg (bench/decode)."""
    import imagecodecs

    if frame.samples != 1:
        return None
    return _grey(imagecodecs.jpeg8_decode(frame.data), frame)


@register("imagecodecs-rle", RLE_LOSSLESS)
def _rle(frame: Frame) -> np.ndarray | None:
    """DICOM RLE: one PackBits segment per byte plane, most significant first (PS3.5 G.2), decoded by imagecodecs.

    Grey 8- and 16-bit films only; signed values narrower than their allocation (which pydicom sign-extends), colour
    and other allocations go to pydicom. bench/decode: 2-3x pydicom's ``pixel_array`` with pylibjpeg-rle."""
    import imagecodecs

    dtype = grey_dtype(frame.bits_allocated, frame.bits_stored, frame.signed)
    if frame.samples != 1 or dtype is None:
        return None
    raw = imagecodecs.dicomrle_decode(frame.data, dtype)
    if len(raw) != frame.rows * frame.columns * dtype.itemsize:
        return None  # segments shorter or longer than the header's frame: pydicom's decoder says what is wrong
    return grey_values(raw, frame.rows, frame.columns, dtype, frame.bits_stored)


@register("charls", JPEG_LS_LOSSLESS, JPEG_LS_NEAR)
def _jpeg_ls(frame: Frame) -> np.ndarray | None:
    import imagecodecs

    if frame.samples != 1:
        return None
    return _grey(imagecodecs.jpegls_decode(frame.data), frame)
