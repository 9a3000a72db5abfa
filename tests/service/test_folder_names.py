"""Names that cannot collide (issue 9, item 6): distinct UIDs keep distinct file names whatever sanitising does, a
different instance is never overwritten, and a second copy of an SOP Instance UID is kept numbered or replaces the
first (``duplicates``), as its sidecar says. Missing layout fields are ``unknown``, never an error."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from filmgate.config import FolderDestinationConfig, parse_config
from filmgate.destinations import Delivery, FolderDestination
from filmgate.spool import Spool, distinct_component
from tests import hostile
from tests.helpers import sha


def folder(tmp_path: Path, **kw) -> FolderDestination:
    cfg = FolderDestinationConfig(name="out", path=str(tmp_path / "out"), fsync=False, **kw)
    return FolderDestination(cfg, Spool(tmp_path / "spool", fsync=False))


def film(tmp_path: Path, name: str, seed: int) -> Path:
    return hostile.save(hostile.small_dataset(seed=seed), tmp_path / f"{name}.dcm")


def delivery(path: Path, uid: str, study: str = "1.2.3") -> Delivery:
    return Delivery(path=path, fields={"SOPInstanceUID": uid, "StudyInstanceUID": study}, record={"sop": "x"})


def files(dest: FolderDestination) -> list[Path]:
    return sorted(p for p in dest.root.rglob("*.dcm"))


def test_uids_that_sanitise_alike_keep_distinct_names(tmp_path):
    dest = folder(tmp_path, layout="{SOPInstanceUID}.dcm")
    long_a, long_b = "1." + "2" * 130 + ".1", "1." + "2" * 130 + ".2"  # equal in their first 128 characters
    uids = ["1.2.3.4/5", "1.2.3.4_5", "1.2.3.4 5", long_a, long_b, "../../etc/passwd"]
    for i, uid in enumerate(uids):
        dest.deliver(delivery(film(tmp_path, f"f{i}", i), uid))
    names = [p.name for p in files(dest)]
    assert len(names) == len(uids), names
    assert "1.2.3.4_5.dcm" in names, "a UID that needs no change keeps its plain name"
    assert all(len(n) <= 128 + 4 for n in names)
    assert all(p.parent == dest.root for p in files(dest)), "nothing outside the folder"
    assert distinct_component("1.2.3.4/5") != distinct_component("1.2.3.4_5")


def test_a_second_copy_is_kept_numbered_and_the_sidecar_says_so(tmp_path):
    dest = folder(tmp_path)
    first, second, third = (film(tmp_path, f"c{i}", i) for i in range(3))
    for path in (first, second, third):
        dest.deliver(delivery(path, "1.2.3.9"))
    got = files(dest)
    assert [p.name for p in got] == ["1.2.3.9-copy2.dcm", "1.2.3.9-copy3.dcm", "1.2.3.9.dcm"]
    assert {sha(p.read_bytes()) for p in got} == {sha(p.read_bytes()) for p in (first, second, third)}
    side = json.loads((dest.root / "1.2.3" / "1.2.3.9-copy2.json").read_text())
    assert side["duplicate"] == {"rule": "keep", "copy": 2, "first": "1.2.3.9.dcm"}
    assert "duplicate" not in json.loads((dest.root / "1.2.3" / "1.2.3.9.json").read_text())


def test_the_same_bytes_again_are_one_file(tmp_path):
    dest = folder(tmp_path)
    path = film(tmp_path, "same", 0)
    dest.deliver(delivery(path, "1.2.3.7"))
    dest.deliver(delivery(path, "1.2.3.7"))  # a re-delivery after a crash, or a sender that sent it twice
    assert [p.name for p in files(dest)] == ["1.2.3.7.dcm"]


def test_replace_rule_replaces_the_same_instance_but_never_a_different_one(tmp_path):
    dest = folder(tmp_path, duplicates="replace", layout="{StudyInstanceUID}.dcm")  # a layout that can collide
    a = hostile.small_dataset(seed=1)
    a_again = hostile.small_dataset(seed=2)
    a_again.SOPInstanceUID = a.SOPInstanceUID
    other = hostile.small_dataset(seed=3)
    paths = [hostile.save(ds, tmp_path / f"r{i}.dcm") for i, ds in enumerate((a, a_again, other))]
    dest.deliver(delivery(paths[0], str(a.SOPInstanceUID), study="S"))
    dest.deliver(delivery(paths[1], str(a.SOPInstanceUID), study="S"))
    assert [p.name for p in files(dest)] == ["S.dcm"]
    assert sha((dest.root / "S.dcm").read_bytes()) == sha(paths[1].read_bytes())
    side = json.loads((dest.root / "S.json").read_text())
    assert side["duplicate"]["rule"] == "replace" and side["duplicate"]["replaced_sha256"] == sha(paths[0].read_bytes())
    dest.deliver(delivery(paths[2], str(other.SOPInstanceUID), study="S"))  # another instance, same name
    assert [p.name for p in files(dest)] == ["S-copy2.dcm", "S.dcm"]
    assert sha((dest.root / "S.dcm").read_bytes()) == sha(paths[1].read_bytes()), "not overwritten"


def test_concurrent_copies_never_overwrite_each_other(tmp_path):
    dest = folder(tmp_path)
    paths = [film(tmp_path, f"t{i}", i) for i in range(8)]
    threads = [threading.Thread(target=dest.deliver, args=(delivery(p, "1.2.3.5"),)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {sha(p.read_bytes()) for p in files(dest)} == {sha(p.read_bytes()) for p in paths}


def test_missing_layout_fields_are_unknown(tmp_path):
    dest = folder(tmp_path, layout="{reason}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm")
    path = film(tmp_path, "bare", 0)
    dest.deliver(Delivery(path=path, fields={"SOPInstanceUID": "1.2.3"}))  # the header could not be read
    assert [p.relative_to(dest.root).as_posix() for p in files(dest)] == ["unknown/unknown/unknown/1.2.3.dcm"]


def test_duplicates_rule_is_checked():
    with pytest.raises(ValueError, match="destinations.out.duplicates"):
        parse_config({"destinations": {"out": {"type": "folder", "path": "o", "duplicates": "overwrite"}},
                      "routes": {"accept": ["out"], "quarantine": ["out"]}})  # fmt: skip
