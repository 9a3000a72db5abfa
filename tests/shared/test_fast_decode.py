"""Reduced-resolution and faster decoders (filmgate.codecs) judge real films as the full decode does.

The reference for every film is pydicom's full decode written back as an uncompressed film: the gate then reads it
by its native path and the existing integer box reduction. Both go through the one judge (real shipped detectors),
so what is compared is what the gate concludes: every detector score within a small tolerance, the same decision.
Films of each syntax are real (the J2K and JPEG baseline files of ../shared/data/dicom) or made from real films by
the encoders the world uses (OpenJPH's ojph_compress, DCMTK's dcmcjpeg/dcmcjpls/dcmcrle, pylibjpeg's J2K).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from filmgate import codecs
from filmgate.config import load_config
from filmgate.decode import decode_dataset, decode_image_bytes, read_dataset
from filmgate.judge import Judge
from tests.helpers import compress, dcmtk, make_dicom

# Largest score difference measured on these films: 0.056 (the view detector on the JPEG 2000 and HTJ2K films decoded
# at 1/4: a wavelet level is a smoother low-pass than the box filter). Lossless full-size decoders differ by 0.
SCORE_TOLERANCE = 0.08

REAL = {  # real compressed films: (file, transfer syntax name as pydicom spells it)
    "j2k-lossy-real": "pydicom__RG1_J2KI.dcm",
    "j2k-lossless-real": "pydicom__RG3_J2KR.dcm",
    "jpeg-baseline-real": "mlmed__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "jpeg-lossless-real": "fo-dicom__GH133.dcm",
    "jpeg-lossless-lut-real": "fo-dicom__CR-ModalitySequenceLUT.dcm",
}
MADE = ("j2k", "htj2k", "htj2k-lossy", "jpeg-ls", "jpeg-lossless", "jpeg-extended", "rle", "jpeg-baseline")


def reference_bytes(path: Path) -> bytes:
    """pydicom's full decode of ``path``, saved uncompressed with the same header."""
    ds = pydicom.dcmread(path)
    ds.decompress(decoding_plugin="pylibjpeg", generate_instance_uid=False)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def films(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Real compressed films, and the other syntaxes made from a real 1760x1760 10-bit CR chest film."""
    out = {name: data_dir / "dicom" / file for name, file in REAL.items()}
    folder = tmp_path_factory.mktemp("syntaxes")
    source = pydicom.dcmread(out["j2k-lossless-real"])
    px = source.pixel_array.astype(np.uint16)
    plain = folder / "plain.dcm"
    make_dicom(px, plain, photometric="MONOCHROME1", bits=10)
    for syntax in ("j2k", "htj2k", "htj2k-lossy", "jpeg-ls", "jpeg-lossless", "rle"):
        out[syntax] = compress(plain, folder / f"{syntax}.dcm", syntax)
    out["jpeg-extended"] = folder / "jpeg-extended.dcm"
    dcmtk("dcmcjpeg", "+ee", plain, out["jpeg-extended"])  # 12-bit lossy JPEG (process 4)
    ds8 = pydicom.dcmread(plain)
    ds8.BitsAllocated, ds8.BitsStored, ds8.HighBit = 8, 8, 7
    ds8.PixelData = (px >> 2).astype(np.uint8).tobytes()
    ds8.save_as(folder / "plain8.dcm", enforce_file_format=True)
    out["jpeg-baseline"] = folder / "jpeg-baseline.dcm"
    dcmtk("dcmcjpeg", "+eb", folder / "plain8.dcm", out["jpeg-baseline"])
    return out


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load(load_config(None))


@pytest.mark.parametrize("name", [*REAL, *MADE])
def test_fast_decode_judges_like_the_full_decode(films, judge, name):
    path = films[name]
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    fast = judge.judge(path.read_bytes())
    full = judge.judge(reference_bytes(path))
    assert fast.error is None and full.error is None
    assert fast.pixels.shape == full.pixels.shape  # the same geometry whichever decoder ran
    assert float(np.abs(fast.pixels - full.pixels).mean()) < 0.01
    diffs = {k: abs(v - full.decision.scores[k]) for k, v in fast.decision.scores.items()}
    assert set(diffs) == set(full.decision.scores) and diffs
    assert max(diffs.values()) < SCORE_TOLERANCE, f"{name}: score differences {diffs}"
    assert (fast.decision.outcome, fast.decision.reasons) == (full.decision.outcome, full.decision.reasons)
    assert codecs.decoder_name(uid) is not None  # every compressed syntax here has a fast decoder


@pytest.mark.parametrize("name", ["j2k-lossless-real", "htj2k", "jpeg-baseline"])
def test_reduced_syntaxes_decode_a_reduced_level(films, name):
    """The syntaxes that can decode reduced do: the decode step says which level it started from."""
    ds = read_dataset(films[name].read_bytes())
    steps = decode_dataset(ds).steps
    assert "reduce:4:decoded-1/4" in steps, steps
    assert "reduce:4" in decode_dataset(read_dataset(films[name].read_bytes()), fast=False).steps
    # a named pydicom plug-in (bench/gpu's nvImageCodec) decodes in full, like fast=False
    assert "reduce:4" in decode_dataset(read_dataset(films[name].read_bytes()), plugin="pylibjpeg").steps


def test_lossless_fast_decoders_are_exact(films):
    """JPEG lossless (libjpeg-turbo), JPEG-LS (CharLS) and RLE (imagecodecs) give pydicom's stored values exactly at
    full size."""
    from filmgate.decode import stored_pixels

    for name in ("jpeg-lossless", "jpeg-ls", "jpeg-lossless-real", "rle"):
        data = films[name].read_bytes()
        ours = stored_pixels(read_dataset(data))
        ref = stored_pixels(read_dataset(data), fast=False)
        np.testing.assert_array_equal(ours, ref)


def rle_film(path: Path, pixels: np.ndarray, *, bits: int, signed: bool = False) -> Path:
    """A grey film of ``pixels`` (8 or 16 bits allocated) compressed by pydicom's own RLE encoder."""
    from pydicom.uid import RLELossless

    make_dicom(np.zeros((2, 2), np.uint16), path)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixels.dtype.itemsize * 8, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rle_decoder_gives_pydicoms_values_for_every_allocation(tmp_path):
    """8 and 16 bits, junk above Bits Stored (masked, as pydicom does), signed values: the same stored values as
    pydicom's decode; signed values narrower than their allocation (pydicom sign-extends them) are left to pydicom."""
    from filmgate.decode import stored_pixels

    rng = np.random.default_rng(7)
    junk = rng.integers(0, 4096, size=(96, 80)).astype(np.uint16)
    junk[10:20, 5:60] |= 0xA000  # an overlay in bits 13 and 15 of a 12-bit film
    cases = {
        "u8": (rng.integers(0, 256, size=(64, 72)).astype(np.uint8), 8, False, True),
        "u16-junk": (junk, 12, False, True),
        "s16": (rng.integers(-30000, 30000, size=(48, 40)).astype(np.int16), 16, True, True),
        "s12-in-16": (rng.integers(-2048, 2048, size=(48, 40)).astype(np.int16), 12, True, False),
    }
    for name, (px, bits, signed, fast) in cases.items():
        data = rle_film(tmp_path / f"{name}.dcm", px, bits=bits, signed=signed).read_bytes()
        ds = read_dataset(data)
        assert (codecs.decode_first_frame(ds, None) is not None) == fast, name
        ours = stored_pixels(ds)
        ref = stored_pixels(read_dataset(data), fast=False)
        assert ours.dtype == ref.dtype, name
        np.testing.assert_array_equal(ours, ref, err_msg=name)
    assert int(stored_pixels(read_dataset((tmp_path / "u16-junk.dcm").read_bytes())).max()) < 4096


def test_rle_segments_that_do_not_fill_the_frame_go_to_pydicom(tmp_path):
    """A segment cut short: the fast decoder hands the film on, pydicom's decoder names what is wrong."""
    import imagecodecs
    from pydicom.encaps import encapsulate, get_frame

    from filmgate.decode import DecodeError, stored_pixels
    from tests import hostile

    path = rle_film(tmp_path / "cut.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits=12)
    ds = pydicom.dcmread(path)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) - 200]])
    assert codecs.decode_first_frame(ds, None) is None
    with pytest.raises(DecodeError, match="cannot be decoded"):
        stored_pixels(ds)
    # segments that decode to more bytes than the frame holds (pylibjpeg-rle panics on this one)
    ds = pydicom.dcmread(hostile.panicking_rle(tmp_path / "panic.dcm", seed=1))
    assert len(imagecodecs.dicomrle_decode(get_frame(ds.PixelData, 0, number_of_frames=1), "<u2")) > 2 * 64 * 64
    assert codecs.decode_first_frame(ds, None) is None


def test_broken_codestream_is_still_undecodable(films, judge):
    """A fast decoder that fails hands the film to pydicom, whose error becomes the quarantine reason."""
    ds = pydicom.dcmread(films["j2k-lossless-real"])
    from pydicom.encaps import encapsulate, get_frame

    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 50]])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    verdict = judge.judge(buf.getvalue())
    assert verdict.decision.outcome == "quarantine"
    assert verdict.error and "undecodable" in verdict.decision.reasons


def test_large_jpeg_file_is_decoded_by_dct_scaling(films, tmp_path):
    """A plain JPEG file larger than the reduced size (the sweep's files) decodes at 1/2^k and lands on the same
    size and nearly the same pixels as the full decode followed by the box reduction."""
    import cv2

    px = pydicom.dcmread(films["j2k-lossless-real"]).pixel_array
    grey = (255 - (px >> 2)).astype(np.uint8)  # a real 1760x1760 chest film as an 8-bit grey JPEG
    ok, jpg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    reduced = decode_image_bytes(jpg.tobytes())
    full = decode_image_bytes(jpg.tobytes(), max_side=None)
    from filmgate.decode import reduce_step

    ref, _ = reduce_step(full.pixels, 512)
    assert reduced.pixels.shape == ref.shape == (440, 440)
    assert float(np.abs(reduced.pixels - ref).mean()) < 0.01
    assert shutil.which("dcmcjpeg")  # the made films above need DCMTK (scripts/bootstrap installs it)
