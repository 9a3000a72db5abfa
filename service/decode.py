"""Pixels to a grey image as a radiologist would see it: ONE module for the gate and for training.

Training and serving must see identical pixels, otherwise a detector learns on one picture of a film and is asked
about another. Every film, DICOM or PNG/JPEG, becomes a float32 array in [0, 1] where 0 is black and 1 is white *as
displayed*. For DICOM that means, as separate pure steps (the order of the DICOM grayscale pipeline, PS3.4 N.2):

1. ``stored_pixels``: decode the first frame, colour converted to grey; ``reduce_step``: films larger than
   ``max_side`` (default :data:`DETECTOR_MAX_SIDE`, 512 px) are shrunk by an integer box filter on the stored
   values. The detectors read 128-192 px inputs, the training films were themselves reduced to a 512 px long side,
   and the grayscale pipeline on a 2048x2500 film costs ~20 ms at full size but under 1 ms reduced. Compressed films
   are decoded by :mod:`filmgate.codecs` where it has a fast decoder: JPEG 2000, HTJ2K and JPEG baseline at the
   coarsest resolution level still at least as large as the reduced film (the reduce step then resamples to exactly
   the size the full decode would have been reduced to), JPEG lossless and JPEG-LS by faster libraries; the rest by
   pydicom with the pylibjpeg plugins;
2. ``modality_step``: Modality LUT Sequence or Rescale Slope/Intercept;
3. ``voi_step``: VOI LUT Sequence or Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID), else a robust
   percentile window, mapped to [0, 1];
4. ``presentation_step``: MONOCHROME1 or Presentation LUT Shape INVERSE inverts, exactly once.

Anything that cannot be turned into pixels raises :class:`DecodeError`; the gate turns that into the quarantine
reason ``undecodable``. So does a film beyond the limits (``limits`` in the node's configuration): a dataset larger
than ``max_bytes`` (a Deflated dataset is inflated incrementally and stopped at that bound, never inflated whole), and
pixel data declaring more than ``max_pixels`` values, checked from Rows x Columns x frames x samples and from the size
the first JPEG / JPEG-LS / JPEG 2000 codestream header declares, before a decoder allocates anything.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_voi_lut

from filmgate.dataset_io import DecodeError, file_size, read_dataset

__all__ = ["DecodeError", "DecodedImage", "decode_bytes", "decode_dataset", "decode_file", "read_dataset"]

from filmgate import codecs

# Long side (pixels) above which films are reduced before the grayscale pipeline: the training films were reduced to
# a 512 px long side by their curators, so serving reduces the same way. None keeps the full resolution.
DETECTOR_MAX_SIDE = 512
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")  # names that make decode_file/decode_bytes read a file as DICOM without its magic
# Percentiles used as the window of a film that carries no VOI at all (raw CR/DX data or a plain image).
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
# Above this many pixels the auto window reads every n-th pixel: the percentiles barely move and decode stays fast.
_AUTO_WINDOW_SAMPLES = 1 << 18
# Default of the node's ``limits.max_pixels``, for callers without a configuration (training, tools).
MAX_PIXELS = 1 << 28


@dataclass(frozen=True)
class DecodedImage:
    """A film ready for preprocessing: ``pixels`` is float32 HxW in [0, 1], white = dense as displayed."""

    pixels: np.ndarray
    kind: str  # "dicom" or "image"
    steps: tuple[str, ...]  # what was applied, e.g. ("rescale", "window", "invert:MONOCHROME1")
    transfer_syntax: str | None = None
    photometric: str | None = None
    frames: int = 1


# --------------------------------------------------------------------------------------------------- reading


def check_pixel_budget(ds: Dataset, max_pixels: int | None = MAX_PIXELS) -> None:
    """Refuse pixel data that would need more than ``max_pixels`` values, before any decoder allocates them: from
    Rows x Columns x NumberOfFrames x SamplesPerPixel, and for compressed data from the size the first frame's
    codestream header declares (which a decoder believes; it must also agree with Rows and Columns)."""
    if max_pixels is None:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"Rows, Columns, NumberOfFrames or SamplesPerPixel missing or not a number ({exc})") from exc
    if min(rows, cols, frames, samples) < 1:
        raise DecodeError(f"pixel data of {cols}x{rows}, {frames} frame(s), {samples} sample(s): nothing to decode")
    total = rows * cols * frames * samples
    if total > max_pixels:
        raise DecodeError(
            f"pixel data declares {cols}x{rows} x {frames} frame(s) x {samples} sample(s) = {total} values, "
            f"more than limits.max_pixels ({max_pixels})"
        )
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or not ts.is_encapsulated or "PixelData" not in ds:
        return
    size = codestream_size(_first_fragment(ds.PixelData))
    if size is None:
        return
    width, height, components = size
    if width * height * components * frames > max_pixels:
        raise DecodeError(
            f"the compressed pixel data declares {width}x{height} x {components} component(s), "
            f"more than limits.max_pixels ({max_pixels})"
        )
    if (width, height) != (cols, rows):
        raise DecodeError(f"the compressed pixel data declares {width}x{height} but Rows/Columns say {cols}x{rows}")


def _first_fragment(pixel_data: bytes) -> bytes:
    from pydicom.encaps import generate_fragments

    try:
        items = generate_fragments(pixel_data)
        next(items)  # the Basic Offset Table
        return next(items)[: 1 << 16]
    except (StopIteration, ValueError, struct.error) as exc:
        raise DecodeError(f"the encapsulated pixel data has no readable fragment ({exc})") from exc


def codestream_size(head: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) declared by a JPEG 2000 (SIZ) or JPEG / JPEG-LS (SOFn) codestream header, or
    None when ``head`` is neither (RLE, or a header cut off)."""
    siz = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ, also inside a JP2 file's codestream box
    if siz >= 0 and len(head) >= siz + 42:
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", head, siz + 8)
        (csiz,) = struct.unpack_from(">H", head, siz + 40)
        return max(0, xsiz - xo), max(0, ysiz - yo), max(1, csiz)
    if head[:2] != b"\xff\xd8":
        return None
    off = 2
    while off + 4 <= len(head):
        if head[off] != 0xFF:
            return None
        marker = head[off + 1]
        if marker == 0xFF:  # fill byte
            off += 1
            continue
        (length,) = struct.unpack_from(">H", head, off + 2)
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:  # SOFn, SOF55 (LS)
            if off + 10 > len(head):
                return None
            height, width = struct.unpack_from(">HH", head, off + 5)
            return width, height, max(1, head[off + 9])
        off += 2 + length
    return None


# --------------------------------------------------------------------------------------------------- DICOM steps


def stored_pixels(
    ds: Dataset, max_side: int | None = None, *, fast: bool = True, plugin: str | None = None
) -> np.ndarray:
    """Decode the first frame of ``ds`` to a 2-D array of stored values (grey) or luminance (colour images).

    With ``max_side`` a compressed film may come back smaller than Rows x Columns (decoded at a reduced resolution,
    never below what :func:`reduce_step` reduces it to); ``fast=False`` always decodes in full with pydicom (the
    reference the fast decoders are tested and benchmarked against); ``plugin`` names the pydicom decoding plug-in
    to decode with in full instead (bench/gpu's nvImageCodec).
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("the dataset has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    native = _native_grey_frame(ds)
    if native is not None:
        return native
    if fast and plugin is None:
        shape = _header_shape(ds)
        target = reduce_target(shape, max_side) if shape is not None else None
        decoded = codecs.decode_first_frame(ds, target[:2] if target else None)
        if decoded is not None:
            arr = decoded[0]
            if arr.shape[0] < 8 or arr.shape[1] < 8:
                raise DecodeError(f"image too small to judge: {arr.shape[1]}x{arr.shape[0]}")
            return arr
    try:
        ds.pixel_array_options(
            index=0 if frames > 1 else None,
            decoding_plugin=plugin if plugin is not None else "pylibjpeg" if _has_pylibjpeg(ds) else "",
        )
        arr = ds.pixel_array
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise DecodeError(f"pixel data cannot be decoded ({getattr(ts, 'name', ts)}): {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = _luminance(arr)  # pydicom 3 already converted YBR to RGB (as_rgb=True)
    elif photometric == "PALETTE COLOR":
        arr = _luminance(apply_color_lut(arr, ds))
    if arr.ndim != 2:
        raise DecodeError(f"unexpected pixel array shape {arr.shape}")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise DecodeError(f"image too small to judge: {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _native_grey_frame(ds: Dataset) -> np.ndarray | None:
    """The first frame of uncompressed little-endian grey pixel data as a view on the received bytes, or None.

    The common case (an uncompressed CR/DX film) needs no decoder: pydicom would copy the frame and mask the unused
    high bits of every pixel (about half of the decode time of a 2048x2500 film). Here bits above Bits Stored are
    masked only when some pixel actually has one set. Anything unusual (signed values narrower than their
    allocation, big endian, colour, 1 or 32 bits, short data) returns None and goes through pydicom.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts.is_compressed or not ts.is_little_endian:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    dtype = codecs.grey_dtype(allocated, stored, signed)
    if (
        samples != 1
        or dtype is None
        or photometric not in ("MONOCHROME1", "MONOCHROME2")
        or not isinstance(data, bytes | bytearray)
        or rows < 8
        or cols < 8
    ):
        return None
    return codecs.grey_values(data, rows, cols, dtype, stored)


def _header_shape(ds: Dataset) -> tuple[int, int] | None:
    try:
        return int(ds.Rows), int(ds.Columns)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _has_pylibjpeg(ds: Dataset) -> bool:
    """True when the pylibjpeg plugin can decode this transfer syntax (we prefer it: measured faster than gdcm)."""
    from pydicom.pixels.decoders.base import get_decoder

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or not ts.is_compressed:
        return False
    try:
        return "pylibjpeg" in get_decoder(ts).available_plugins
    except Exception:
        return False


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def reduce_target(shape: tuple[int, ...], max_side: int | None) -> tuple[int, int, int] | None:
    """(rows, columns, factor) that :func:`reduce_step` brings a film of ``shape`` to, or None when it stays."""
    if max_side is None or max(shape[:2]) <= max_side:
        return None
    factor = -(-max(shape[:2]) // max_side)
    if shape[0] < factor or shape[1] < factor:
        return None
    return shape[0] // factor, shape[1] // factor, factor


def reduce_step(
    arr: np.ndarray, max_side: int | None, full_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, str | None]:
    """Shrink by the smallest integer factor that brings the long side to ``max_side`` or less (box filter).

    Edge rows/columns beyond a multiple of the factor are dropped (fewer than the factor): that keeps OpenCV on
    its fast exact-area path (about 4 ms instead of 14 ms for a 2048x2500 16-bit film). ``full_shape`` is the
    film's size when ``arr`` was decoded at a reduced resolution: the result then has exactly the size the full
    film would have been reduced to (an area resample from the decoded level), so every later step and detector
    sees the same geometry whichever decoder ran.
    """
    full = tuple(full_shape) if full_shape is not None else arr.shape[:2]
    target = reduce_target(full, max_side)
    if target is None:
        return arr, None
    th, tw, factor = target
    src = arr if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32) else arr.astype(np.float32)
    if arr.shape[:2] == full:
        h, w = th * factor, tw * factor
        crop = src[:h, :w]
        if crop.strides[-1] != crop.itemsize or crop.strides[0] < 0:
            crop = np.ascontiguousarray(crop)  # OpenCV takes rows with any stride, but pixels must be adjacent
        small = cv2.resize(crop, (tw, th), interpolation=cv2.INTER_AREA)
        return small, f"reduce:{factor}"
    if arr.shape[:2] != (th, tw):
        src = cv2.resize(np.ascontiguousarray(src), (tw, th), interpolation=cv2.INTER_AREA)
    level = round(full[0] / arr.shape[0])
    return src, f"reduce:{factor}:decoded-1/{level}"


def modality_step(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str | None]:
    """Apply the Modality LUT Sequence or Rescale Slope/Intercept; returns float32 values and the step's name."""
    if ds.get("ModalityLUTSequence"):
        try:
            return lut_lookup(arr, ds.ModalityLUTSequence[0], _little_endian(ds)), "modality-lut"
        except Exception as exc:
            raise DecodeError(f"Modality LUT Sequence cannot be applied: {exc}") from exc
    out = arr.astype(np.float32, copy=False)
    slope = _number(ds.get("RescaleSlope"), 1.0)
    intercept = _number(ds.get("RescaleIntercept"), 0.0)
    if slope != 1.0 or intercept != 0.0:
        return out * np.float32(slope) + np.float32(intercept), "rescale"
    return out, None


def lut_lookup(arr: np.ndarray, item: Dataset, little_endian: bool = True) -> np.ndarray:
    """Apply a LUT item (LUTDescriptor + LUTData, PS3.3 C.11.1.1) to stored values, as float32.

    Written here rather than with pydicom's helper because that one fails on descriptors of 9 to 15 bits (it asks
    numpy for a ``uint12`` type), which real CR files carry.
    """
    entries, first_map, _bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    elem = item["LUTData"]
    if isinstance(elem.value, bytes | bytearray):
        lut = np.frombuffer(elem.value, dtype="<u2" if little_endian else ">u2")[:entries]
    else:
        lut = np.asarray(
            elem.value if isinstance(elem.value, list | tuple | pydicom.multival.MultiValue) else [elem.value]
        )
    lut = lut.astype(np.float32)
    index = np.clip(arr.astype(np.int64, copy=False) - first_map, 0, len(lut) - 1)
    return lut[index]


def _little_endian(ds: Dataset) -> bool:
    ts = ds.file_meta.get("TransferSyntaxUID")
    return bool(ts.is_little_endian) if ts is not None else True


def voi_step(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1] with the VOI LUT, the first window, or a robust auto window."""
    if ds.get("VOILUTSequence"):
        try:
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            lut_input = np.rint(arr).astype(np.int32) if arr.dtype.kind == "f" else arr
            out = apply_voi_lut(lut_input, ds, index=0, prefer_lut=True).astype(np.float32)
            return np.clip(out / np.float32(2**bits - 1), 0.0, 1.0), "voi-lut"
        except Exception:
            pass  # a broken LUT falls back to the window or the auto window
    window = _first_window(ds)
    if window is not None:
        center, width = window
        func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        return window_to_unit(arr, center, width, func), f"window:{func.lower()}"
    lo, hi = auto_window(arr)
    return _linear(arr, lo, hi), "auto-window"


def presentation_step(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str | None]:
    """Invert MONOCHROME1 or Presentation LUT Shape INVERSE, exactly once (a DX MONOCHROME1 carries both)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1":
        return 1.0 - arr, "invert:MONOCHROME1"
    if shape == "INVERSE":
        return 1.0 - arr, "invert:presentation-lut"
    return arr, None


def window_to_unit(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM windowing (PS3.3 C.11.2.1.2) straight to [0, 1] in float32."""
    if function == "SIGMOID":
        width = max(width, 1e-6)
        return (1.0 / (1.0 + np.exp(-4.0 * (arr - np.float32(center)) / np.float32(width)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        lo, hi = center - width / 2.0, center + width / 2.0
    else:  # LINEAR, and unknown functions treated as LINEAR
        width = max(width, 1.0)
        lo, hi = center - 0.5 - (width - 1) / 2.0, center - 0.5 + (width - 1) / 2.0
    return _linear(arr, lo, hi)


def auto_window(arr: np.ndarray) -> tuple[float, float]:
    """A robust window (0.5th to 99.5th percentile) for images that carry none."""
    flat = arr.reshape(-1)
    step = max(1, flat.size // _AUTO_WINDOW_SAMPLES)
    sample = flat[::step]
    found = integer_percentiles(sample, AUTO_WINDOW_PERCENTILES)
    lo, hi = found if found is not None else np.percentile(sample, AUTO_WINDOW_PERCENTILES)
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


# Integer values spanning more than this many steps go to np.percentile (the counts would outgrow the sample).
_COUNTED_RANGE = 1 << 20


def integer_percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> tuple[float, ...] | None:
    """``np.percentile(values, percentiles)`` (its default, linear method) for a 1-D array of whole numbers, from
    counts of each value instead of a partition: the same numbers, in about a tenth of the time on a reduced film's
    stored values (np.percentile was 40% of the decode of an uncompressed DX film without a window). Floats count
    when every value is whole (the Modality step hands on stored values as float32 when there is no rescale):
    numpy interpolates their order statistics in float64, as here. None when ``values`` holds a fraction, a NaN or
    an infinity, is empty, or spans more than :data:`_COUNTED_RANGE` values."""
    if values.dtype.kind not in "iuf" or values.size == 0:
        return None
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            whole = values.astype(np.int64)
        if not np.array_equal(whole, values):
            return None
        values = whole
    low, high = int(values.min()), int(values.max())
    if high - low > _COUNTED_RANGE:
        return None
    base = 0 if low >= 0 and high <= _COUNTED_RANGE else low  # stored values count as they are, without a shift
    counts = np.bincount(values.astype(np.int64) - base if base else values)
    below = np.cumsum(counts)  # below[v]: how many values are <= base + v
    out = []
    for q in percentiles:
        index = q / 100.0 * (values.size - 1)
        first = int(np.floor(index))
        a = base + int(np.searchsorted(below, first, side="right"))  # the first-th smallest (0-based)
        b = base + int(np.searchsorted(below, min(first + 1, values.size - 1), side="right"))
        t = index - first
        # numpy's _lerp: the same arithmetic, so the same float
        out.append(float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t))
    return tuple(out)


def _linear(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    scale = np.float32(1.0 / (hi - lo))
    out = (arr.astype(np.float32, copy=False) - np.float32(lo)) * scale
    return np.clip(out, 0.0, 1.0, out=out)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center = _first_number(ds.WindowCenter)
    width = _first_number(ds.WindowWidth)
    if center is None or width is None or width <= 0:
        return None
    return center, width


def _first_number(value: object) -> float | None:
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    return _number(value, None)


def _number(value: object, default: float | None) -> float | None:  # type: ignore[return]
    try:
        return float(value) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def decode_dataset(
    ds: Dataset,
    max_side: int | None = DETECTOR_MAX_SIDE,
    max_pixels: int | None = MAX_PIXELS,
    *,
    fast: bool = True,
    plugin: str | None = None,
) -> DecodedImage:
    """The whole DICOM pipeline: stored pixels -> reduce -> modality -> VOI -> presentation, to float32 [0, 1].

    ``fast=False`` decodes compressed films in full with pydicom (the reference for tests and ``bench/decode``);
    ``plugin`` with a pydicom decoding plug-in's name (bench/gpu: nvImageCodec's).
    """
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        check_pixel_budget(ds, max_pixels)
    arr = stored_pixels(ds, max_side, fast=fast, plugin=plugin)
    steps: list[str] = []
    arr, step = reduce_step(arr, max_side, _header_shape(ds) if arr.shape != _header_shape(ds) else None)
    if step:
        steps.append(step)
    arr, step = modality_step(arr, ds)
    if step:
        steps.append(step)
    arr, step = voi_step(arr, ds)
    steps.append(step)
    arr, step = presentation_step(arr, ds)
    if step:
        steps.append(step)
    if not np.isfinite(arr).all():
        raise DecodeError("pixel values are not finite after the grayscale pipeline")
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return DecodedImage(
        pixels=np.ascontiguousarray(arr, dtype=np.float32),
        kind="dicom",
        steps=tuple(steps),
        transfer_syntax=str(ts) if ts else None,
        photometric=str(ds.get("PhotometricInterpretation", "")) or None,
        frames=frames,
    )


# --------------------------------------------------------------------------------------------------- plain images


def decode_image_bytes(data: bytes, max_side: int | None = DETECTOR_MAX_SIDE) -> DecodedImage:
    """PNG/JPEG/... bytes to float32 [0, 1] grey (8 or 16 bit, colour to luminance)."""
    if not data:
        raise DecodeError("empty input")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img, full_shape = _imdecode(buf, max_side)
    except cv2.error as exc:
        raise DecodeError(f"not a readable image file: {exc}") from exc
    if img is None:
        raise DecodeError("not a readable image file")
    info_max = 65535.0 if img.dtype == np.uint16 else 255.0  # of the stored samples, before colour -> grey
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[..., :3]
        img = img[..., ::-1]  # BGR -> RGB
        img = _luminance(img)
    # One rule for every plain image, colour or grey, small or large: stored value / the type's maximum, as a viewer
    # shows the file. (Colour images up to 512 px used to be min-max stretched instead: the children's 224 px copies
    # got another intensity mapping than every other film, a shortcut for the detectors.)
    img, step = reduce_step(img, max_side, full_shape)
    pixels = np.clip(img.astype(np.float32) / np.float32(info_max), 0.0, 1.0)
    steps = (step, "scale") if step else ("scale",)
    return DecodedImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), kind="image", steps=steps)


_CV2_REDUCED = {
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
}


def _imdecode(buf: np.ndarray, max_side: int | None) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """OpenCV's decode; a JPEG larger than the reduced size is decoded by libjpeg's DCT scaling (1/2, 1/4, 1/8).

    Returns the image and, when it was decoded reduced, the full (rows, columns) for :func:`reduce_step`. The
    reduced decode keeps the file's grey or colour layout (and ignores EXIF orientation, like the full decode), so
    the later steps are the same either way.
    """
    if max_side is not None and buf[:2].tobytes() == b"\xff\xd8":
        try:
            import simplejpeg

            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(buf.tobytes(), strict=False)
        except Exception:  # not a header libjpeg-turbo reads (12-bit, lossless, broken): full decode
            h = w = 0
        target = reduce_target((h, w), max_side) if h and w else None
        if target is not None:
            scale = 1
            while scale < 8 and -(-h // (scale * 2)) >= target[0] and -(-w // (scale * 2)) >= target[1]:
                scale *= 2
            if scale > 1:
                flags = _CV2_REDUCED[scale, colorspace.upper() == "GRAY"] | cv2.IMREAD_IGNORE_ORIENTATION
                img = cv2.imdecode(buf, flags)
                if img is not None:
                    return img, (h, w)
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), None


def is_dicom_bytes(head: bytes) -> bool:
    """True for a Part 10 file (DICM at 128) or a raw dataset that starts with a group 0x0008 element."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] < b"\x20\x00"


def decode_file(path: str | os.PathLike[str], max_side: int | None = DETECTOR_MAX_SIDE) -> DecodedImage:
    """Decode a film from disk, DICOM or an ordinary image; the format is told by content, not by name."""
    path = Path(path)
    suffix = path.suffix.lower()
    file_size(path)  # a FIFO or a device is refused before it is opened
    try:
        if is_dicom_file(path, suffix):
            return decode_dataset(read_dataset(path), max_side)  # read from the file: one copy of the pixels
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read {path.name}: {exc.strerror}") from exc
    return decode_bytes(data, suffix=suffix, max_side=max_side)


def is_dicom(head: bytes, suffix: str, dicom_suffixes: tuple[str, ...] = DICOM_SUFFIXES) -> bool:
    """Whether a film is read as DICOM rather than as an image: its first 132 bytes (:func:`is_dicom_bytes`), or
    ``suffix`` among ``dicom_suffixes``."""
    return is_dicom_bytes(head[:132]) or suffix in dicom_suffixes


def is_dicom_file(path: Path, suffix: str, dicom_suffixes: tuple[str, ...] = DICOM_SUFFIXES) -> bool:
    """:func:`is_dicom` for a file on disk, from its first 132 bytes (read_dataset then reads it from the file)."""
    with path.open("rb") as fh:
        head = fh.read(132)
    return is_dicom(head, suffix, dicom_suffixes)


def decode_bytes(data: bytes, suffix: str = "", max_side: int | None = DETECTOR_MAX_SIDE) -> DecodedImage:
    if is_dicom(data, suffix):
        return decode_dataset(read_dataset(data), max_side)
    if suffix in IMAGE_SUFFIXES or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"\xff\xd8":
        return decode_image_bytes(data, max_side)
    # Unknown suffix and no magic: try DICOM (raw datasets), then images.
    try:
        return decode_dataset(read_dataset(data), max_side)
    except DecodeError:
        return decode_image_bytes(data, max_side)
