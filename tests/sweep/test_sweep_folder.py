"""``filmgate sweep`` over a folder tree made from real films: rows, decisions, report, sorted trees, resume."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np

from filmgate_training.datasets import select
from tests.helpers import FILMGATE, SKIPPED, committed_rows, inspect, read_csv, run_sweep, wait_until


def test_one_row_per_film_with_the_decision_of_inspect(film_tree, swept):
    rows, films = swept["rows"], film_tree["films"]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a film appears twice"
    assert set(paths) == set(films), f"missing {set(films) - set(paths)}, extra {set(paths) - set(films)}"
    by_path = {r["path"]: r for r in rows}
    verdicts = inspect([film_tree["root"] / p for p in sorted(films)])
    for path in films:
        row, want = by_path[path], verdicts[str(film_tree["root"] / path)]
        assert row["decision"] == want["decision"], path
        assert row["reasons"] == ";".join(want["reasons"]), path
        for det, score in want["scores"].items():
            assert abs(float(row[f"{det}_score"]) - score) < 1e-5, (path, det)
        for det, cls in want.get("predicted", {}).items():
            assert row[f"{det}_class"] == cls, (path, det)
    for path in film_tree["truncated"]:
        assert by_path[path]["decision"] == "quarantine" and "undecodable" in by_path[path]["reasons"], path
        assert by_path[path]["error"], path
    # DICOM rows carry their UID and header facts as stored; plain images have none.
    made = by_path["made/DX1"]
    assert made["sop_instance_uid"].startswith("1.") and made["modality"] == "DX" and made["patient_age"] == "045Y"
    assert all(not by_path[p]["sop_instance_uid"] for p, k in films.items() if k == "image")
    assert "rotated" in by_path["made/ROT1"]["reasons"]


def test_skipped_files_and_summary(film_tree, swept):
    skipped = {r["path"]: r["reason"] for r in read_csv(swept["out"] / "skipped.csv")}
    assert set(skipped) == SKIPPED
    assert "DICOMDIR" in skipped["archive/DICOMDIR"]
    summary, rows = swept["summary"], swept["rows"]
    assert summary["complete"] is True and summary["films"] == len(rows) and summary["skipped"] == len(SKIPPED)
    assert sum(summary["by_decision"].values()) == len(rows)
    for reason, n in summary["by_reason"].items():
        assert n == sum(reason in r["reasons"].split(";") for r in rows)
    folders = {p.split("/", 1)[0] for p in film_tree["films"]}
    assert set(summary["by_folder"]) == folders
    assert sum(f["films"] for f in summary["by_folder"].values()) == len(rows)


def test_parquet_holds_the_same_rows(swept):
    import pyarrow.parquet as pq

    table = pq.read_table(swept["out"] / "results.parquet").to_pylist()
    assert [(r["path"], r["decision"], r["reasons"]) for r in table] == [
        (r["path"], r["decision"], r["reasons"]) for r in swept["rows"]
    ]
    assert isinstance(table[0]["view_score"], float)


class _Report(HTMLParser):
    """The contact sheets of report.html: reason -> [(data-key, caption, img bytes, href)], and the histograms."""

    def __init__(self) -> None:
        super().__init__()
        self.sheets: dict[str, list[dict]] = {}
        self.hists: list[str] = []
        self._sheet: str | None = None
        self._fig: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "sheet":
            self._sheet = a["data-reason"]
            self.sheets[self._sheet] = []
        elif tag == "figure" and self._sheet is not None:
            self._fig = {"key": a["data-key"], "caption": "", "img": None, "href": None}
            self.sheets[self._sheet].append(self._fig)
        elif tag == "img" and self._fig is not None:
            self._fig["img"] = base64.b64decode(a["src"].split(",", 1)[1])
        elif tag == "a" and self._fig is not None:
            self._fig["href"] = a["href"]
        elif tag == "svg" and "aria-label" in a:
            self.hists.append(a["aria-label"])

    def handle_endtag(self, tag):
        if tag == "figure":
            self._fig = None
        elif tag == "div" and self._fig is None:
            self._sheet = None

    def handle_data(self, data):
        if self._fig is not None:
            self._fig["caption"] += data


def test_report_contact_sheets_hold_the_flagged_films(film_tree, swept):
    page = _Report()
    page.feed((swept["out"] / "report.html").read_text())
    rows = swept["rows"]
    reasons = {r for row in rows for r in row["reasons"].split(";") if r}
    assert set(page.sheets) == reasons | {"accept"}
    for reason in reasons:
        flagged = {r["path"] for r in rows if reason in r["reasons"].split(";")}
        figures = page.sheets[reason]
        assert [f["key"] for f in figures if f["key"] in flagged] == [f["key"] for f in figures]
        assert {f["key"] for f in figures} == flagged, reason
        scores = [float(m.group(1)) for f in figures if (m := re.search(r" (\d+\.\d+)", f["caption"]))]
        assert scores == sorted(scores, reverse=True), f"{reason}: not most confident first"
        for f in figures:
            assert (swept["out"] / f["href"]).resolve() == (film_tree["root"] / f["key"]).resolve()
            if f["key"] not in film_tree["truncated"]:
                img = cv2.imdecode(np.frombuffer(f["img"], np.uint8), cv2.IMREAD_GRAYSCALE)
                assert img is not None and max(img.shape) <= 192, f["key"]
                assert img.std() > 1 or f["key"].startswith("dicom/real/"), f"{f['key']}: a blank picture"
    accepted = {r["path"] for r in rows if r["decision"] == "accept"}
    assert page.sheets["accept"] and {f["key"] for f in page.sheets["accept"]} <= accepted
    detectors = swept["summary"]["detectors"]
    assert sorted(page.hists) == sorted(f"{d} scores" for d in detectors) and len(detectors) >= 5


def test_sort_into_trees_match_the_csv(film_tree, swept):
    root, tree = film_tree["root"], swept["sorted"]
    expected = set()
    for r in swept["rows"]:
        where = "accept" if r["decision"] == "accept" else f"quarantine/{r['reasons'].split(';')[0]}"
        dst = tree / where / r["path"]
        expected.add(dst)
        assert dst.is_file(), dst
        assert dst.stat().st_ino == (root / r["path"]).stat().st_ino, f"{dst} is not a hard link of the film"
    assert {p for p in tree.rglob("*") if p.is_file()} == expected


def _copy_films(dst: Path, count: int) -> list[Path]:
    films = [f.path for f in select(split="val") if f.path.suffix in (".png", ".jpg")][:count]
    out = []
    for i, src in enumerate(films):
        target = dst / f"part{i % 3}" / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        out.append(target)
    return out


def test_interrupted_sweep_resumes_and_judges_every_film_once(tmp_path):
    films = _copy_films(tmp_path / "films", 160)
    out = tmp_path / "out"
    proc = subprocess.Popen([FILMGATE, "sweep", str(tmp_path / "films"), "--out", str(out), "--jobs", "1",
                             "--batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    wait_until(lambda: committed_rows(out) >= 12 or proc.poll() is not None, 120, "the first rows", interval=0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    first = json.loads((out / "summary.json").read_text())
    assert first["complete"] is False and 12 <= first["films"] < len(films), first
    assert len(read_csv(out / "results.csv")) == first["films"]

    again = run_sweep(tmp_path / "films", "--out", out, "--jobs", "2")
    rows = read_csv(out / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(tmp_path / "films").as_posix() for p in films)
    second = json.loads((out / "summary.json").read_text())
    assert second["complete"] is True
    assert second["run"]["judged_this_run"] == len(films) - first["films"], again.stderr

    # A changed file is judged again (and only it): a chest film replaced by a rotated copy of itself.
    changed = films[0]
    img = cv2.imread(str(changed), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(changed), np.ascontiguousarray(np.rot90(img)))
    run_sweep(tmp_path / "films", "--out", out)
    third = json.loads((out / "summary.json").read_text())
    assert third["run"]["judged_this_run"] == 1 and third["films"] == len(films)
    rel = changed.relative_to(tmp_path / "films").as_posix()
    now = read_csv(out / "results.csv")
    assert len(now) == len(films) and [r["path"] for r in now].count(rel) == 1
    row = next(r for r in now if r["path"] == rel)
    before = next(r for r in rows if r["path"] == row["path"])
    assert row["orientation_score"] != before["orientation_score"]


def _workers_of(pid: int) -> list[int]:
    """The sweep's worker processes: its children running the same command (not multiprocessing's helpers)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == own]


def test_a_worker_that_dies_costs_no_film(tmp_path):
    films = _copy_films(tmp_path / "films", 60)
    out = tmp_path / "out"
    proc = subprocess.Popen([FILMGATE, "sweep", str(tmp_path / "films"), "--out", str(out), "--jobs", "2",
                             "--batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers = wait_until(lambda: proc.poll() is None and len(_workers_of(proc.pid)) == 2 and _workers_of(proc.pid),
                         60, "two workers")  # fmt: skip
    wait_until(lambda: committed_rows(out) >= 8 or proc.poll() is not None, 120, "the first rows", interval=0.02)
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer or a crashing decoder would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "a sweep worker died" in err
    rows = read_csv(out / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(tmp_path / "films").as_posix() for p in films)
    assert not [r for r in rows if r["error"]], "a film of the dead worker's batch was not judged again"


def test_progress_bar_with_rate_and_time_left_on_a_terminal_only(film_tree, swept, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: filmgate sweep with its stderr on a terminal of 120 x 30
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        os.execv(FILMGATE, [FILMGATE, "sweep", str(film_tree["root"] / "chest"), "--out", str(tmp_path / "out")])
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "film/s" in text and "100%" in text and "<" in text, text[-2000:]  # rate, done, time left (elapsed<left)
    assert "film/s" not in swept["stderr"] and "%|" not in swept["stderr"]  # not a terminal: quiet


def test_output_folders_inside_the_source_are_not_swept(tmp_path):
    data = tmp_path / "data"
    films = _copy_films(data, 12)
    for _ in range(2):  # the second run finds the first one's outputs and sorted links inside the source
        run_sweep(data, "--out", data / "sweep-out", "--sort-into", data / "sorted", "--jobs", "1")
    rows = read_csv(data / "sweep-out" / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(data).as_posix() for p in films)
    assert read_csv(data / "sweep-out" / "skipped.csv") == []


def test_a_folder_in_use_by_another_sweep_is_refused(film_tree, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / "sweep.lock", "a+") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_sweep(film_tree["root"] / "chest", "--out", out, check=False)
    assert proc.returncode == 1 and "in use by another filmgate sweep" in proc.stderr, proc.stderr
    assert not (out / "results.csv").exists()


def test_from_list_judges_the_files_named_and_lists_the_missing(film_tree, swept, tmp_path):
    root = film_tree["root"]
    (tmp_path / "made").symlink_to(root / "made")  # a relative line resolves against the list's folder
    listing = tmp_path / "films.txt"
    os.mkfifo(tmp_path / "pipe")  # reading it would block: listed as skipped, never opened
    lines = ["# films to check", str(root / "made" / "DX1"), "made/ROT1", "", str(root / "other"),
             str(root / "gone.dcm"), str(tmp_path / "pipe")]  # fmt: skip
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_sweep("--from-list", listing, "--out", out)
    rows = {r["path"]: r for r in read_csv(out / "results.csv")}
    others = {p.name for p in (root / "other").iterdir()}
    assert set(rows) == {str(root / "made" / "DX1"), "made/ROT1"} | {f"{root / 'other'}/{n}" for n in others}
    local = {r["path"]: r for r in swept["rows"]}
    assert rows["made/ROT1"]["decision"] == local["made/ROT1"]["decision"]
    assert rows[str(root / "made" / "DX1")]["reasons"] == local["made/DX1"]["reasons"]
    assert read_csv(out / "skipped.csv") == [{"path": str(root / "gone.dcm"), "reason": "no such file"},
                                             {"path": str(tmp_path / "pipe"), "reason": "not a regular file"}]


def _hostile_entries(folder: Path) -> dict[str, str]:
    """Entries a real dataset folder can hold that are not films, and the reason each must be skipped with."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.dcm")  # opening it would block until a writer comes: forever
    (folder / "zero.dcm").symlink_to("/dev/zero")  # never ends
    (folder / "noise.png").symlink_to("/dev/urandom")
    (folder / "loop-a").symlink_to("loop-b")  # a link loop: stat raises ELOOP
    (folder / "loop-b").symlink_to("loop-a")
    (folder / "gone.dcm").symlink_to("nowhere.dcm")
    (folder / "up").symlink_to("..")  # a link to a folder above: followed, the walk would never end
    return {"pipe.dcm": "not a regular file", "zero.dcm": "not a regular file", "noise.png": "not a regular file",
            "loop-a": "cannot stat: Too many levels of symbolic links",
            "loop-b": "cannot stat: Too many levels of symbolic links",
            "gone.dcm": "cannot stat: No such file or directory",
            "up": "a symbolic link to a folder (not followed; name the folder itself to sweep it)"}  # fmt: skip


def test_link_loops_fifos_devices_and_dangling_links_are_skipped_with_their_reason(tmp_path):
    data = tmp_path / "data"
    films = _copy_films(data, 6)
    hostile = _hostile_entries(data / "part0" / "odd")
    out = tmp_path / "out"
    run_sweep(data, "--out", out, "--jobs", "1", timeout=120)  # a link loop used to end the sweep with ELOOP
    rows = read_csv(out / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(p.relative_to(data).as_posix() for p in films)
    skipped = {r["path"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert skipped == {f"part0/odd/{name}": why for name, why in hostile.items()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["skipped"] == len(hostile)


def test_inspect_does_not_open_a_fifo_or_a_device(tmp_path):
    hostile = _hostile_entries(tmp_path / "odd")
    names = [n for n, why in hostile.items() if why == "not a regular file"] + ["up"]
    got = inspect([tmp_path / "odd" / n for n in names])  # a FIFO blocked it forever, /dev/zero read without end
    for name in names:
        line = got[str(tmp_path / "odd" / name)]
        assert line["decision"] == "quarantine" and line["reasons"] == ["undecodable"], line
        assert "not a regular file" in line["error"] or "it is a folder" in line["error"], line
