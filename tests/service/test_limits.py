"""Bounded memory for every film (issue 9, item 1): a Deflated dataset is inflated with a limit, pixel buffers are
bounded before any decoder allocates them (JPEG 2000 headers that lie included), and decoding runs in a supervised
child process where a panic, a crash, a runaway allocation or a stall costs one film and the child is restarted."""

from __future__ import annotations

import os
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from filmgate.config import LimitsConfig
from filmgate.dataset_io import read_header
from filmgate.judge import decode_film
from filmgate.sandbox import DecodeSandbox
from tests import hostile


def restarts(cause: str) -> float:
    return REGISTRY.get_sample_value("filmgate_decode_restarts_total", {"cause": cause}) or 0.0


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """200 MiB once inflated, about 200 kB on disk."""
    return hostile.deflate_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm", 200 << 20)


def decode_with_peak(path: Path, max_dataset_bytes: int) -> tuple[Any, int]:
    """The examined film and the most memory Python held while decoding it within ``max_dataset_bytes``."""
    tracemalloc.start()
    try:
        ex = decode_film(path, limits=LimitsConfig(max_dataset_bytes=max_dataset_bytes))
        return ex, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_deflate_bomb_is_inflated_only_up_to_the_limit(bomb):
    assert bomb.stat().st_size < 1 << 20
    ex, peak = decode_with_peak(bomb, 50 << 20)
    assert ex.error and "limits.max_dataset_bytes" in ex.error and ex.pixels is None
    assert ex.metadata.decode_error == ex.error, "it becomes the undecodable reason"
    assert peak < 150 << 20, f"inflating stopped near the 50 MiB limit, not at 200 MiB (peak {peak >> 20} MiB)"
    # Within the limit the same film decodes: the bound is what refuses it, not the syntax.
    assert decode_film(bomb).error is None


def test_a_deflate_bomb_whose_syntax_hides_behind_a_long_file_meta_is_still_bounded(tmp_path):
    """Files are read by pydicom from disk once the first 64 KiB show they are not Deflated; a File Meta group
    longer than that must not pass for "not Deflated" (pydicom would inflate the whole dataset)."""
    hidden = hostile.deflate_bomb(tmp_path / "hidden.dcm", 200 << 20, meta_padding=100_000)
    ex, peak = decode_with_peak(hidden, 50 << 20)
    assert ex.error and "limits.max_dataset_bytes" in ex.error, ex.error
    assert peak < 150 << 20, f"peak {peak >> 20} MiB"


def test_the_header_check_does_not_inflate_the_dataset_whole(bomb):
    tracemalloc.start()
    try:
        ds = read_header(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(ds.SOPInstanceUID) and str(ds.SOPClassUID) == hostile.DX
    assert peak < 40 << 20, f"the header of a 200 MiB deflated dataset read with {peak >> 20} MiB"


def test_a_file_above_the_limit_is_refused_before_it_is_read(tmp_path):
    path = hostile.save(hostile.small_dataset(256, 256), tmp_path / "big.dcm")
    ex = decode_film(path, limits=LimitsConfig(max_dataset_bytes=1000))
    assert ex.error and "limits.max_dataset_bytes" in ex.error


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda p: hostile.huge_header(p), "60000x60000 x 1 frame(s)"),
        (lambda p: hostile.huge_header(p, 2048, 2048, frames=1000), "1000 frame(s)"),
        (lambda p: hostile.j2k_declaring(p, 60000, 60000), "compressed pixel data declares 60000x60000"),
        (lambda p: hostile.j2k_declaring(p, 60000, 60000, header_too=True), "60000x60000 x 1 frame(s)"),
    ],
    ids=["rows-columns", "frames", "j2k-siz", "j2k-and-header"],
)
def test_pixel_buffers_are_bounded_before_decoding(tmp_path, make, expect):
    ex = decode_film(make(tmp_path / "film.dcm"))
    assert ex.error and expect in ex.error and "limits.max_pixels" in ex.error


def test_a_codestream_that_disagrees_with_rows_and_columns_is_undecodable(tmp_path):
    ex = decode_film(hostile.j2k_declaring(tmp_path / "film.dcm", 128, 64))
    assert ex.error and "declares 128x64 but Rows/Columns say 64x64" in ex.error
    assert decode_film(hostile.j2k_declaring(tmp_path / "ok.dcm", 64, 64)).error is None


def test_the_decode_child_costs_one_film_and_is_restarted(tmp_path):
    good = hostile.save(hostile.small_dataset(), tmp_path / "good.dcm")
    panic = hostile.panicking_rle(tmp_path / "panic.dcm")
    # A 60000x60000 JPEG 2000 with the pixel bound off: only the child's address-space limit stands in the way.
    lying = hostile.j2k_declaring(tmp_path / "lying.dcm", 60000, 60000, header_too=True)
    sandbox = DecodeSandbox(LimitsConfig(max_pixels=1 << 40, decode_memory_bytes=1 << 30), size=1)
    try:
        ex = sandbox.decode(panic)
        assert ex.error and "PanicException" in ex.error, ex.error
        assert sandbox.decode(good).error is None, "the same child decodes the next film"
        ex = sandbox.decode(lying)
        assert ex.error and ex.pixels is None
        assert sandbox.decode(good).pixels.shape == (64, 64)
        # A child that dies (here: killed from outside) is noticed and started again; its film is not lost.
        before = restarts("crash")
        os.kill(sandbox._children[0].proc.pid, signal.SIGKILL)
        sandbox._children[0].proc.join(10)
        assert sandbox.decode(good).error is None
        assert restarts("crash") == before + 1
    finally:
        sandbox.close()


def test_a_decode_that_does_not_finish_in_time_is_killed(tmp_path, bomb):
    good = hostile.save(hostile.small_dataset(), tmp_path / "good.dcm")
    sandbox = DecodeSandbox(LimitsConfig(decode_timeout=0.05), size=1)
    try:
        before = restarts("timeout")
        ex = sandbox.decode(bomb)  # inflating 200 MiB takes far longer than 50 ms
        assert ex.error and "limits.decode_timeout" in ex.error
        assert restarts("timeout") == before + 1
        assert sandbox.decode(good).error is None, "the restarted child decodes the next film"
    finally:
        sandbox.close()


# A film decoded 5 times after a first one; prints the page faults per film (ru_minflt) of the decoding process.
_FAULTS_PER_FILM = """
import resource, sys
from pathlib import Path
from filmgate.judge import decode_film
film = Path(sys.argv[1])
assert decode_film(film).error is None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    decode_film(film)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # field 10, minflt


def test_decode_child_keeps_film_sized_blocks_between_films(tmp_path, data_dir):
    """The decode child does not page-fault each film's megabytes in again (runtime.keep_heap): a real CR chest
    film as a DX-sized RLE film, decoded in the node's child, against the same decodes in a plain interpreter."""
    import subprocess
    import sys

    import cv2
    import numpy as np
    import pydicom

    from tests.helpers import compress, make_dicom

    cr = pydicom.dcmread(data_dir / "dicom" / "pydicom__RG3_J2KR.dcm").pixel_array.astype(np.float32)
    # as a 2048x2500 14-bit DX film, with a detector's noise (what keeps RLE from packing it small)
    px = cv2.resize(cr, (2048, 2500), interpolation=cv2.INTER_CUBIC) * 16 + np.random.default_rng(0).normal(
        0, 8, size=(2500, 2048))  # fmt: skip
    make_dicom(np.clip(px, 0, 16383).astype(np.uint16), tmp_path / "plain.dcm", photometric="MONOCHROME1", bits=14)
    film = compress(tmp_path / "plain.dcm", tmp_path / "rle.dcm", "rle")
    plain = float(subprocess.run([sys.executable, "-c", _FAULTS_PER_FILM, str(film)], check=True, text=True,
                                 capture_output=True).stdout)  # fmt: skip
    sandbox = DecodeSandbox(LimitsConfig(), size=1)
    try:
        pid = sandbox._children[0].proc.pid
        assert sandbox.decode(film).error is None
        before = _minor_faults(pid)
        for _ in range(5):
            assert sandbox.decode(film).pixels is not None
        child = (_minor_faults(pid) - before) / 5
    finally:
        sandbox.close()
    assert plain > 100, f"the plain interpreter faulted only {plain} pages per film: nothing to compare"
    assert child < plain / 4, f"decode child {child} page faults per film, a plain interpreter {plain}"
