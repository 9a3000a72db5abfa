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
    # every compressed syntax but RLE has a fast decoder (pydicom's RLE decoder takes 4 ms for 1760x1760)
    assert (codecs.decoder_name(uid) is None) == (name == "rle")


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
    """JPEG lossless (libjpeg-turbo) and JPEG-LS (CharLS) give pydicom's stored values exactly at full size."""
    from filmgate.decode import stored_pixels

    for name in ("jpeg-lossless", "jpeg-ls", "jpeg-lossless-real"):
        data = films[name].read_bytes()
        ours = stored_pixels(read_dataset(data))
        ref = stored_pixels(read_dataset(data), fast=False)
        np.testing.assert_array_equal(ours, ref)


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
