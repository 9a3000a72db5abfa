"""filmgate.receive: the files incoming datasets are written to while they arrive."""

from __future__ import annotations

import os

from filmgate import receive


def test_writeback_of_an_arriving_dataset_starts_while_it_arrives_and_keeps_every_byte(tmp_path):
    """The bytes are handed to the disk in WRITEBACK_STEP pieces as they arrive (so the fdatasync before the
    acknowledgement waits for the last piece only); the file holds exactly what was written."""
    assert receive._start_writeback is not None, "libc's sync_file_range was not found"
    pieces = [os.urandom(128 << 10) for _ in range(40)]  # 5 MiB in DCMTK's 128 KiB PDUs
    f = receive.ReceiveFile(tmp_path, ".dcm", None, receive.WRITEBACK_STEP)
    for piece in pieces:
        f.write(memoryview(piece)[1:])  # as the DIMSE layer writes a fragment: a view without its control byte
        f.flush()
    assert f._kicked >= len(pieces) * ((128 << 10) - 1) - receive.WRITEBACK_STEP, "writeback was not started"
    f.close()
    assert not f.failed
    with open(f.name, "rb") as fh:
        assert fh.read() == b"".join(p[1:] for p in pieces)


def test_without_early_writeback_nothing_is_started_and_every_byte_is_kept(tmp_path):
    """spool.early_writeback: false (or spool.fsync: false): the fdatasync at the end does all the writeback."""
    pieces = [os.urandom(128 << 10) for _ in range(20)]
    f = receive.ReceiveFiles(tmp_path, lambda: None, early_writeback=False)()
    for piece in pieces:
        f.write(piece)
    assert f._kicked == 0
    f.close()
    with open(f.name, "rb") as fh:
        assert fh.read() == b"".join(pieces)


def test_the_listener_follows_spool_early_writeback(tmp_path):
    """The key reaches the files the listener writes (``ReceiveFiles.for_spool``, what the listener builds; a
    Listener is not made here: it installs its receive files for every SCP in this process, the tests' receivers
    too): on in the shipped default.yaml, off when set so or when spool.fsync is off (nothing to hurry then)."""
    import inspect
    from pathlib import Path

    from filmgate import listener
    from filmgate.config import load_config
    from filmgate.spool import Spool

    assert "ReceiveFiles.for_spool(spool)" in inspect.getsource(listener.Listener.__init__)
    shipped = load_config(Path(receive.__file__).with_name("default.yaml"), metadata_only=True).spool
    assert shipped.early_writeback is True and shipped.fsync is True
    steps = {}
    for name, fsync, early in (("shipped", shipped.fsync, shipped.early_writeback), ("off", True, False),
                               ("no-fsync", False, True)):  # fmt: skip
        spool = Spool(tmp_path / name, fsync=fsync, early_writeback=early)
        files = receive.ReceiveFiles.for_spool(spool)
        assert files.folder == spool.tmp
        steps[name] = files.writeback_step
    assert steps == {"shipped": receive.WRITEBACK_STEP, "off": 0, "no-fsync": 0}


def test_starting_writeback_on_a_real_file_succeeds(tmp_path):
    assert receive._start_writeback is not None, "the node runs on Linux, which has sync_file_range"
    path = tmp_path / "x"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_WRONLY)
    try:
        assert receive._start_writeback(fd, 0, 1 << 20) == 0
    finally:
        os.close(fd)
