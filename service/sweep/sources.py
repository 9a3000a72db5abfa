"""Which files of the sources are films: DICOM (with or without an extension, with or without a preamble), PNG,
JPEG; every other file is *skipped* with a reason, never an error.

Folders are walked recursively (sorted, symlinked folders not followed: a link loop must not make a sweep endless).
A DICOMDIR is a media index, not a film: it is listed as skipped and the files it references are swept (also those the
walk would not reach, e.g. when only the DICOMDIR was named). Everything here streams: a folder of millions of files
is never held in memory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Plain images the judge decodes (the same list as the decoder's, limited to what research datasets use).
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_VR = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
       b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
       b"UT", b"UV", b"SV"}  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """One file found in a source: ``kind`` is dicom, png, jpeg, dicomdir or skip (then ``reason`` says why)."""

    source: str  # the source's label in the results (its folder name, or "" for a single source)
    path: str  # relative to the source, with "/" separators (the results' ``path``)
    abspath: str
    size: int
    mtime_ns: int
    kind: str
    reason: str = ""


def sniff(head: bytes, name: str) -> str:
    """The kind of a file from its first 132 bytes (and its name only where the bytes cannot tell)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in IMAGE_MAGIC.items():
        if head.startswith(magic):
            return kind
    # No preamble (ACR-NEMA style or a bare dataset): a low group number, then an explicit VR or an implicit length
    # that is not absurd.
    if (len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00", b"\x10\x00")
            and (head[4:6] in _VR or int.from_bytes(head[4:8], "little") < 1 << 16)):  # fmt: skip
        return "dicom"
    if name.lower().endswith((".dcm", ".dicom")) and head:
        return "dicom"  # an unusual first element: let the judge try (it reports undecodable if it cannot)
    return "skip"


def _is_dicomdir(path: Path, name: str) -> bool:
    if name.upper() == "DICOMDIR":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return DICOMDIR_CLASS.encode() in head


def dicomdir_files(path: Path) -> Iterator[Path]:
    """The files a DICOMDIR references (ReferencedFileID, relative to the DICOMDIR's folder)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        records = ds.get("DirectoryRecordSequence") or []
    except Exception:
        return
    for rec in records:
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(ref)] if isinstance(ref, str) else [str(p) for p in ref]  # one component, or a MultiValue
        parts = [q for p in parts for q in p.replace("\\", "/").split("/") if q]
        yield path.parent.joinpath(*parts)


def classify(abspath: Path, source: str, rel: str) -> Candidate:
    try:
        st = abspath.stat()
    except OSError as exc:
        return Candidate(source, rel, str(abspath), 0, 0, "skip", f"cannot stat: {exc.strerror}")
    if stat.S_ISDIR(st.st_mode):  # reached through a symbolic link: followed, a link loop could make it endless
        return Candidate(source, rel, str(abspath), 0, st.st_mtime_ns, "skip",
                         "a symbolic link to a folder (not followed; name the folder itself to sweep it)")  # fmt: skip
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device: reading it could block the sweep or never end
        return Candidate(source, rel, str(abspath), 0, st.st_mtime_ns, "skip", "not a regular file")
    if st.st_size == 0:
        return Candidate(source, rel, str(abspath), 0, st.st_mtime_ns, "skip", "empty file")
    try:
        with open(abspath, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return Candidate(source, rel, str(abspath), st.st_size, st.st_mtime_ns, "skip", f"cannot read: {exc.strerror}")
    kind = sniff(head, abspath.name)
    reason = ""
    if kind == "dicom" and _is_dicomdir(abspath, abspath.name):
        kind, reason = "dicomdir", "DICOMDIR (a media index; the files it references are swept)"
    elif kind == "skip":
        reason = "not a DICOM, PNG or JPEG file"
    return Candidate(source, rel, str(abspath), st.st_size, st.st_mtime_ns, kind, reason)


def _walk(root: Path, exclude: frozenset[str]) -> Iterator[Path | tuple[Path, str]]:
    """Every entry under ``root`` that is not a folder, sorted, without following symlinked folders or entering
    ``exclude`` (the sweep's own output folders); a folder that cannot be listed is yielded as (folder, why). A link
    loop, a dangling link or a FIFO is yielded too: it is skipped with its reason, not silently left out, and once
    ``DirEntry.is_file()`` on a link loop raised and ended the whole sweep."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        yield root, f"cannot list the folder: {exc.strerror}"
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if os.path.realpath(entry.path) not in exclude:
                yield from _walk(Path(entry.path), exclude)
        else:  # files, and what is not one (links to folders, dangling links, link loops, FIFOs, devices, sockets):
            yield Path(entry.path)  # classify() lists those as skipped with the reason, never opens them


def source_labels(sources: Iterable[str]) -> dict[str, str]:
    """The label of each source in the results: "" when there is one source, else its base name (made unique)."""
    sources = list(sources)
    if len(sources) <= 1:
        return {s: "" for s in sources}
    labels: dict[str, str] = {}
    used: set[str] = set()
    for s in sources:
        base = Path(s.rstrip("/")).name or "source"
        label, n = base, 1
        while label in used:
            n += 1
            label = f"{base}-{n}"
        used.add(label)
        labels[s] = label
    return labels


def candidates(sources: Iterable[str], exclude: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Candidate]:
    """Every file of ``sources`` (files and folders) classified, DICOMDIR references included, each once; folders in
    ``exclude`` (the sweep's --out and --sort-into, when they lie inside a source) are not entered."""
    sources = list(sources)
    skip_dirs = frozenset(os.path.realpath(p) for p in exclude)
    labels = source_labels(sources)
    seen_refs: set[str] = set()  # only DICOMDIR references outside the walk need remembering
    for src in sources:
        label = labels[src]
        root = Path(src)
        if root.is_dir():
            base, files = root, _walk(root, skip_dirs)
        else:
            base, files = root.parent, iter([root])
        for f in files:
            if isinstance(f, tuple):
                folder, why = f
                yield Candidate(label, (folder.relative_to(base).as_posix() or ".") + "/", str(folder), 0, 0, "skip",
                                why)  # fmt: skip
                continue
            rel = f.relative_to(base).as_posix()
            cand = classify(f, label, rel)
            yield cand
            if cand.kind == "dicomdir":
                for ref in dicomdir_files(f):
                    inside = root.is_dir() and ref.resolve().is_relative_to(root.resolve())
                    if inside or str(ref) in seen_refs or not ref.is_file():
                        continue  # the walk finds it (or already did)
                    seen_refs.add(str(ref))
                    yield classify(ref, label, os.path.relpath(ref, base).replace(os.sep, "/"))


def listed(list_file: str) -> Iterator[Candidate]:
    """The files named in ``list_file`` (one path a line; blank lines and lines starting with # ignored); each
    result's ``path`` is the line as written."""
    with open(list_file, encoding="utf-8") as fh:
        for line in fh:
            name = line.rstrip("\n").strip()
            if not name or name.startswith("#"):
                continue
            p = Path(name)
            if not p.is_absolute():
                p = Path(list_file).parent / p if not p.exists() else p
            if p.is_dir():
                for cand in candidates([str(p)]):
                    yield Candidate("", f"{name.rstrip('/')}/{cand.path}", cand.abspath, cand.size, cand.mtime_ns,
                                    cand.kind, cand.reason)  # fmt: skip
            elif not p.exists():
                yield Candidate("", name, str(p), 0, 0, "skip", "no such file")
            else:
                c = classify(p, "", name)
                yield c
