"""The grayscale pipeline on real DICOM files and on synthetic datasets whose right answer is known."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from filmgate.decode import DecodeError, decode_bytes, decode_dataset, decode_file, read_dataset, window_to_unit


def make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> Dataset:
    """A minimal valid grey dataset around ``pixels`` (uint16 or int16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def ramp(h: int = 64, w: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 4000, w, dtype=np.float64), (h, 1)).astype(np.uint16)


def test_window_maps_center_to_half_and_clips():
    arr = np.array([[0, 1000, 2000, 3000, 4000]], dtype=np.float32)
    out = window_to_unit(arr, center=2000.5, width=2001)
    assert out[0, 0] == 0.0 and out[0, -1] == 1.0
    assert out[0, 2] == pytest.approx(0.5, abs=1e-3)


def test_monochrome1_is_inverted_exactly_once():
    mono2 = decode_dataset(make_ds(ramp())).pixels
    mono1 = decode_dataset(make_ds(ramp(), "MONOCHROME1")).pixels
    assert np.allclose(mono1, 1.0 - mono2, atol=1e-6)
    # A DX MONOCHROME1 film also says INVERSE in its Presentation LUT Shape: that is the same inversion, not a second.
    both = decode_dataset(make_ds(ramp(), "MONOCHROME1", PresentationLUTShape="INVERSE")).pixels
    assert np.allclose(both, mono1, atol=1e-6)
    inverse2 = decode_dataset(make_ds(ramp(), "MONOCHROME2", PresentationLUTShape="INVERSE")).pixels
    assert np.allclose(inverse2, mono1, atol=1e-6)


def test_rescale_then_window_in_modality_units():
    raw = ramp()
    ds = make_ds(raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2000)
    out = decode_dataset(ds)
    assert out.steps[:2] == ("rescale", "window:linear")
    values = raw.astype(np.float32) * 2 - 1000
    expected = np.clip((values - (3000 - 0.5 - 999.5)) / 1999, 0, 1)
    assert np.allclose(out.pixels, expected, atol=1e-4)


def test_modality_lut_sequence_is_applied():
    raw = ramp().clip(0, 4095)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.ModalityLUTType = "US"
    lut.LUTData = (4095 - np.arange(4096, dtype=np.uint16)).tobytes()  # a LUT that reverses the values
    ds = make_ds(raw, ModalityLUTSequence=[lut])
    ds.ModalityLUTSequence[0]["LUTData"].VR = "OW"
    out = decode_dataset(ds)
    assert out.steps[0] == "modality-lut"
    plain = decode_dataset(make_ds(raw)).pixels
    assert np.corrcoef(out.pixels.ravel(), plain.ravel())[0, 1] < -0.99


def test_colour_secondary_capture_becomes_grey():
    rgb = np.zeros((32, 40, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    ds = make_ds(np.zeros((32, 40), np.uint16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    out = decode_dataset(ds)
    assert out.pixels.shape == (32, 40)


def test_multiframe_decodes_first_frame(data_dir):
    out = decode_file(data_dir / "dicom" / "fo-dicom__HasFragmentSequence.dcm")
    assert out.frames == 96 and out.pixels.ndim == 2


def test_file_without_meta_is_read_with_force(data_dir):
    out = decode_file(data_dir / "dicom" / "fo-dicom__CR-MONO1-10-chest.dcm")
    assert out.pixels.shape == (440, 440)
    assert "invert:MONOCHROME1" in out.steps


def test_every_real_dicom_decodes_to_unit_range(data_dir):
    files = sorted((data_dir / "dicom").glob("*.dcm"))
    assert len(files) >= 17
    for path in files:
        out = decode_file(path)
        assert out.pixels.dtype == np.float32 and out.pixels.ndim == 2, path.name
        assert float(out.pixels.min()) >= 0.0 and float(out.pixels.max()) <= 1.0, path.name


def test_real_monochrome1_chest_looks_like_a_normal_film(data_dir):
    """After a correct decode the lungs (upper middle band, left and right) are darker than the mediastinum."""
    for name in ("pydicom__RG1_J2KI.dcm", "fo-dicom__CR-MONO1-10-chest.dcm"):
        px = decode_file(data_dir / "dicom" / name).pixels
        h, w = px.shape
        lungs = np.concatenate(
            [px[h // 4 : h // 2, w // 6 : w // 3].ravel(), px[h // 4 : h // 2, 2 * w // 3 : 5 * w // 6].ravel()]
        )
        spine = px[h // 4 : h // 2, 9 * w // 20 : 11 * w // 20]
        assert lungs.mean() < spine.mean(), name


def test_fake_monochrome1_is_the_inverse_of_its_original(data_dir):
    real = decode_file(data_dir / "dicom" / "mlmed__1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm").pixels
    fake = decode_file(data_dir / "dicom" / "mlmed__Fake_MONOHR1.dcm").pixels
    assert np.corrcoef(real.ravel(), fake.ravel())[0, 1] < -0.95


def test_png_and_jpeg_decode(data_dir):
    from filmgate_training.datasets import select

    for film in select(split="val", kind="frontal-chest")[:3]:
        out = decode_file(film.path)
        assert out.kind == "image" and out.pixels.ndim == 2 and out.pixels.max() <= 1.0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 10,
        b"random bytes that are not an image",
        bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    ],
)
def test_garbage_raises_decode_error(payload):
    with pytest.raises(DecodeError):
        decode_bytes(payload)


def test_dataset_without_pixels_is_a_decode_error():
    ds = make_ds(ramp())
    del ds.PixelData
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_dataset(read_dataset(buf.getvalue()))


def test_truncated_pixel_data_is_a_decode_error(data_dir):
    data = (data_dir / "dicom" / "pydicom__RG1_J2KI.dcm").read_bytes()
    with pytest.raises(DecodeError):
        decode_bytes(data[: len(data) // 2])


def test_large_film_is_reduced_before_the_grayscale_pipeline():
    """A DX-sized film is box-reduced to a long side <= 512; the picture matches a full-resolution decode."""
    rng = np.random.default_rng(3)
    base = cv2.resize(rng.integers(0, 4096, (25, 20)).astype(np.float32), (2048, 2500), interpolation=cv2.INTER_CUBIC)
    raw = np.clip(base, 0, 4095).astype(np.uint16)
    ds = make_ds(raw, WindowCenter=2048, WindowWidth=3000)
    reduced = decode_dataset(ds)
    assert "reduce:5" in reduced.steps and max(reduced.pixels.shape) <= 512
    full = decode_dataset(ds, max_side=None).pixels
    expected = cv2.resize(full[:2500, :2045], reduced.pixels.shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.pixels - expected).mean() < 0.01


def test_training_sized_films_are_not_reduced(data_dir):
    from filmgate_training.datasets import select

    for film in select(split="val", kind="frontal-chest", source="nih-cxr14")[:3]:
        out = decode_file(film.path)
        assert out.steps == ("scale",) and max(out.pixels.shape) == 512


@pytest.mark.parametrize(
    "bits_stored, signed, frames",
    [(12, False, 1), (16, False, 1), (16, True, 1), (12, True, 1), (12, False, 3)],
)
def test_native_fast_path_matches_pydicom(bits_stored, signed, frames):
    """Uncompressed grey pixels read without pydicom's decoder equal pydicom's, garbage high bits included."""
    from filmgate.decode import stored_pixels

    rng = np.random.default_rng(bits_stored + frames)
    raw = rng.integers(0, 65536, (frames, 40, 48), dtype=np.uint16)  # high bits above Bits Stored set at random
    ds = make_ds(raw[0].view(np.int16) if signed else raw[0])
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelData = raw.tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    ours = stored_pixels(read_dataset(buf.getvalue()))
    ref_ds = read_dataset(buf.getvalue())
    ref_ds.pixel_array_options(index=0 if frames > 1 else None)
    assert np.array_equal(ours, ref_ds.pixel_array)


@pytest.mark.parametrize("lossless", [True, False], ids=["htj2k-lossless", "htj2k-lossy"])
def test_htj2k_films_decode_like_their_uncompressed_original(tmp_path, data_dir, lossless):
    """High-Throughput JPEG 2000 (encoded by OpenJPH's ojph_compress): lossless decodes exactly, lossy closely."""
    from filmgate_training.datasets import select
    from tests.helpers import HTJ2K, HTJ2K_LOSSLESS, film_pixels, htj2k, make_dicom

    film = select(split="val", kind="frontal-chest", source="hannover")[0]
    plain = tmp_path / "plain.dcm"
    make_dicom(film_pixels(film.path), plain)
    ht = htj2k(plain, tmp_path / "ht.dcm", lossless=lossless)
    assert str(pydicom.dcmread(ht, stop_before_pixels=True).file_meta.TransferSyntaxUID) == (
        HTJ2K_LOSSLESS if lossless else HTJ2K
    )
    a, b = decode_file(plain).pixels, decode_file(ht).pixels
    assert a.shape == b.shape
    if lossless:
        np.testing.assert_array_equal(a, b)
    else:
        assert float(np.abs(a - b).mean()) < 0.01 and not np.array_equal(a, b)


@pytest.mark.parametrize("side", [500, 512, 520, 1000])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", [".png", ".jpg"])
def test_plain_images_have_one_intensity_rule_for_colour_and_grey_at_every_size(side, channels, fmt):
    """A plain image decodes to stored value / 255 whether colour or grey and whether or not it is reduced: a film
    whose values span 64..156 keeps that span (once, colour images up to 512 px were min-max stretched to [0, 1])."""
    rng = np.random.default_rng(side)
    grey = cv2.resize(rng.integers(64, 157, (12, 10)).astype(np.float32), (side * 5 // 6, side),
                      interpolation=cv2.INTER_LINEAR)  # fmt: skip
    grey = np.clip(np.round(grey), 64, 156).astype(np.uint8)
    img = grey if channels == 1 else np.repeat(grey[:, :, None], 3, axis=2)
    ok, buf = cv2.imencode(fmt, img, [cv2.IMWRITE_JPEG_QUALITY, 98] if fmt == ".jpg" else [])
    assert ok
    out = decode_bytes(buf.tobytes(), suffix=fmt)
    assert out.steps[-1] == "scale"
    assert out.steps[-1] == "scale" and (out.steps[0].startswith("reduce:2") if side > 512 else len(out.steps) == 1)
    expected = grey.astype(np.float32) / 255
    if side > 512:
        expected = cv2.resize(expected[: side // 2 * 2, : (side * 5 // 6) // 2 * 2], out.pixels.shape[::-1],
                              interpolation=cv2.INTER_AREA)  # fmt: skip
    tol = 0.004 if fmt == ".png" else 0.02
    assert abs(float(out.pixels.min()) - 64 / 255) < 0.03 and abs(float(out.pixels.max()) - 156 / 255) < 0.03
    assert np.abs(out.pixels - expected).max() < tol


def test_colour_and_grey_copies_of_one_film_decode_alike_on_both_sides_of_512():
    """The same film stored as colour and as grey PNG gives the same pixels, small or large (up to the rounding of
    the 8-bit box filter used on grey films: half a grey level)."""
    rng = np.random.default_rng(7)
    for side in (480, 600):
        grey = rng.integers(30, 220, (side, side - 40)).astype(np.uint8)
        colour = np.repeat(grey[:, :, None], 3, axis=2)
        a = decode_bytes(cv2.imencode(".png", grey)[1].tobytes(), suffix=".png").pixels
        b = decode_bytes(cv2.imencode(".png", colour)[1].tobytes(), suffix=".png").pixels
        assert a.shape == b.shape and np.abs(a - b).max() <= (1e-5 if side <= 512 else 0.5 / 255 + 1e-5), side


def test_sixteen_bit_colour_png_is_scaled_by_its_own_range():
    rgb = np.full((40, 30, 3), 32768, np.uint16)
    out = decode_bytes(cv2.imencode(".png", rgb)[1].tobytes(), suffix=".png")
    assert abs(float(out.pixels.mean()) - 32768 / 65535) < 1e-4


def test_the_decode_fix_changes_only_the_unit_input_of_a_childrens_hospital_film(data_dir):
    """Why only ``atypical`` was rebuilt after the decode fix: a `kermany` (3-channel, 224 px) film decoded by the
    old rule (min-max stretch) and the new one (/255) differ by an affine map, which z-scoring removes (orientation,
    inversion, flip, view, pediatric inputs unchanged) and the ``unit`` input keeps (atypical)."""
    from filmgate.preprocess import PreprocessSpec, preprocess
    from filmgate_training.datasets import select

    film = sorted(select(split="val", source="kermany"), key=lambda f: str(f.path))[0]
    new = decode_file(film.path).pixels
    old = (new - new.min()) / (new.max() - new.min())  # what colour files of at most 512 px decoded to before
    assert np.abs(old - new).max() > 0.05  # the fix did change this film
    z = PreprocessSpec(128, "letterbox", "zscore")
    u = PreprocessSpec(128, "letterbox", "unit")
    assert np.abs(preprocess(old, z) - preprocess(new, z)).max() < 1e-3
    assert np.abs(preprocess(old, u) - preprocess(new, u)).max() > 0.05


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32])
def test_counted_percentiles_are_numpys_to_the_last_bit(dtype):
    """filmgate.decode.integer_percentiles (the auto window's) gives np.percentile's very floats: ranges starting
    at 0, far from it and below it, single values, and percentiles between order statistics on either side of 0.5."""
    from filmgate.decode import integer_percentiles

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    for trial in range(300):
        low = int(rng.integers(max(info.min, -40000), min(info.max, 70000)))
        high = min(int(info.max), low + int(rng.integers(0, 5000 if trial % 4 else 900_000)))
        values = rng.integers(low, high + 1, size=int(rng.integers(1, 4000))).astype(dtype)
        qs = (0.5, 99.5) if trial % 2 else tuple(float(q) for q in rng.uniform(0, 100, size=3))
        assert integer_percentiles(values, qs) == tuple(float(v) for v in np.percentile(values, qs)), (trial, qs)
        if high - low < 1 << 24:  # whole float32 values, as the Modality step hands stored values on
            wide = values.astype(np.float32)
            assert integer_percentiles(wide, qs) == tuple(float(v) for v in np.percentile(wide, qs)), (trial, qs)
    assert integer_percentiles(np.array([], dtype=dtype), (0.5,)) is None


def test_counted_percentiles_leave_floats_and_wide_ranges_to_numpy():
    from filmgate.decode import integer_percentiles

    assert integer_percentiles(np.linspace(0, 1, 100, dtype=np.float32), (0.5, 99.5)) is None
    assert integer_percentiles(np.array([0, 1 << 30], dtype=np.int64), (0.5, 99.5)) is None
    for odd in (np.nan, np.inf, -np.inf, 0.5):
        assert integer_percentiles(np.array([1.0, 2.0, odd, 4.0], dtype=np.float32), (0.5, 99.5)) is None


def test_the_auto_window_of_every_real_film_is_numpys_percentile(data_dir):
    """On the real DICOM films, as the Modality step hands them to the VOI step (reduced as the pipeline reduces
    them, and in full), the auto window equals np.percentile's, and the counted path is the one taken wherever the
    values are whole (every film without a rescale to fractions)."""
    from filmgate import decode
    from filmgate.decode import AUTO_WINDOW_PERCENTILES, auto_window, integer_percentiles, modality_step

    files = sorted((data_dir / "dicom").glob("*.dcm"))
    checked = counted = 0
    for path in files:
        ds = read_dataset(path)
        for stored in (decode.stored_pixels(ds), decode.reduce_step(decode.stored_pixels(ds, 512), 512)[0]):
            arr = modality_step(stored, ds)[0]
            flat = arr.reshape(-1)
            sample = flat[:: max(1, flat.size // decode._AUTO_WINDOW_SAMPLES)]
            lo, hi = (float(v) for v in np.percentile(sample, AUTO_WINDOW_PERCENTILES))
            if hi <= lo:
                lo, hi = float(flat.min()), float(flat.max())
            assert auto_window(arr) == (lo, hi), path.name
            checked += 1
            counted += integer_percentiles(sample, AUTO_WINDOW_PERCENTILES) is not None
    assert checked >= 20 and counted >= 0.8 * checked, (checked, counted)
