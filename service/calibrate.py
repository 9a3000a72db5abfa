"""Site calibration: thresholds fitted to a site's own films, measured on faults made from those same films.

A detector's threshold was chosen on the training hospitals; a new site's films (another vendor, another processing)
can shift every score, so a threshold that flagged 0.3 % there flags 4 % here. ``filmgate calibrate FOLDER`` judges
a random sample of the site's films, which are assumed to be mostly clean, through the one judge
(:mod:`filmgate.judge`), and makes the synthetic faults each detector exists for out of the films the gate accepts:
rotations by 90, 180 and 270 degrees (``rotated``), grey inversions (``inverted``) and left-right mirrors
(``flipped``), the transforms training uses. For each of these detectors it proposes the lowest threshold that brings
its flag rate on the site's films to ``--target`` without letting its recall on the synthetic faults fall below the
goal; a threshold is never raised past the point where recall would fall below the goal (then the target is reported
as not reached), nor lowered below the one in force (the manifest's, or the base configuration's). Detectors with no
synthetic fault (``not-frontal-chest``, ``pediatric``, ``atypical``) have their flag rate reported and keep their
threshold: nothing here measures what a higher threshold would let through.

The result is a configuration file: the ``--config`` given (or the defaults) with ``policy.thresholds`` set, which
``filmgate check-config`` validates and ``filmgate serve --config`` loads, and a short Markdown report. The models are
only read, never written.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from filmgate.config import Config, parse_config
from filmgate.judge import Judge

# The synthetic faults of each detector reason (the transforms of training/tasks.py: numpy.rot90, 1 - x, fliplr).
FAULTS: dict[str, tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...]] = {
    "rotated": (
        ("rot90", lambda px: np.rot90(px, 1)),
        ("rot180", lambda px: np.rot90(px, 2)),
        ("rot270", lambda px: np.rot90(px, 3)),
    ),
    "inverted": (("inverted", lambda px: 1.0 - px),),
    "flipped": (("mirrored", lambda px: px[:, ::-1]),),
}
# Recall goals on the synthetic faults (issue "Detectors that hold on hospitals they never saw").
DEFAULT_RECALL = {"rotated": 0.998, "inverted": 0.9995, "flipped": 0.98}
DEFAULT_TARGET = 0.005  # false flags on clean films at most 0.5 %
JUDGED_KINDS = ("dicom", "png", "jpeg")


@dataclass(frozen=True)
class CalibrateOptions:
    folder: Path
    out: Path
    report: Path | None = None  # default: beside --out, .md
    sample: int = 500
    seed: int = 0
    target: float = DEFAULT_TARGET
    recall: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RECALL))
    batch: int = 16
    base_config: Path | None = None


@dataclass
class DetectorReport:
    name: str
    reason: str
    current: float
    proposed: float
    flag_rate_now: float
    flag_rate_proposed: float
    films: int
    faults: int = 0
    recall_now: float | None = None
    recall_proposed: float | None = None
    goal: float | None = None
    note: str = ""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k/n (stays inside [0, 1] at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def sample_files(folder: Path, size: int, seed: int) -> tuple[list[Path], int]:
    """A reproducible random sample of the DICOM, PNG and JPEG files under ``folder``; also how many there were."""
    from filmgate.sweep.sources import candidates

    files = [Path(c.abspath) for c in candidates([str(folder)]) if c.kind in JUDGED_KINDS]
    total = len(files)
    if size and total > size:
        files = sorted(random.Random(seed).sample(files, size))
    return files, total


def propose(clean: np.ndarray, faults: np.ndarray | None, current: float, target: float,
            goal: float | None) -> tuple[float, str]:  # fmt: skip
    """The threshold for one detector and a note. ``clean``: its scores on the site's films; ``faults``: on the
    synthetic faults it must catch (None: none exist, the threshold stays)."""
    if faults is None or not len(faults) or goal is None:
        return current, "no synthetic fault measures its recall: threshold kept"
    allowed = int(math.floor(target * len(clean) + 1e-9))  # films it may flag
    desc = np.sort(clean)[::-1]
    # the lowest threshold flagging at most `allowed` films: just above the (allowed+1)-th highest score
    at_target = float(np.nextafter(desc[allowed], np.inf)) if allowed < len(desc) else current
    misses = int(math.floor((1.0 - goal) * len(faults) + 1e-9))  # faults it may miss and still meet the goal
    at_goal = float(np.sort(faults)[misses])  # the highest threshold that still catches the rest
    want = max(current, at_target)
    if want <= at_goal:
        return want, "target reached" if at_target > current else "already within the target"
    if at_goal >= current:
        return at_goal, "target not reached: a higher threshold would miss more synthetic faults than the goal allows"
    return current, "the recall goal is not met even at the manifest's threshold: threshold kept, see recall"


def calibrate(cfg: Config, opts: CalibrateOptions, judge: Judge | None = None,
              log: Callable[[str], None] = print) -> list[DetectorReport]:  # fmt: skip
    """Judge the sample, make and judge the faults, propose thresholds, write the config and the report."""
    judge = judge or Judge.load(cfg)
    files, total = sample_files(opts.folder, opts.sample, opts.seed)
    if not files:
        raise ValueError(f"no DICOM, PNG or JPEG files under {opts.folder}")
    log(f"judging {len(files)} of {total} films under {opts.folder}, and the synthetic faults of those it accepts")
    detectors = {d.name: d.manifest for d in judge.detectors.detectors}
    by_reason = {m.reason: name for name, m in detectors.items()}
    faulted = {by_reason[r]: FAULTS[r] for r in FAULTS if r in by_reason}
    clean_scores: dict[str, list[float]] = {name: [] for name in detectors}
    fault_scores: dict[str, list[float]] = {name: [] for name in faulted}
    counts = {"judged": 0, "undecodable": 0, "accepted": 0}
    pending: list[tuple[str, Any]] = []  # (detector, examined synthetic fault)

    def flush() -> None:
        for (name, _), j in zip(pending, judge.conclude([ex for _, ex in pending]), strict=True):
            if name in j.decision.scores:
                fault_scores[name].append(j.decision.scores[name])
        pending.clear()

    # Streamed: only scores are kept, never the films' pixels (a sample of thousands stays small in memory).
    for _, j in judge.judge_many(files, batch=opts.batch):
        counts["judged"] += 1
        if j.error is not None or j.pixels is None:
            counts["undecodable"] += 1
            continue
        for name, score in j.decision.scores.items():
            if name in clean_scores:
                clean_scores[name].append(score)
        if j.decision.outcome != "accept":
            continue
        counts["accepted"] += 1
        for name, transforms in faulted.items():
            for _, transform in transforms:
                pending.append((name, judge.examine_pixels(np.ascontiguousarray(transform(j.pixels)))))
        if len(pending) >= opts.batch:
            flush()
    if pending:
        flush()
    log(f"{counts['judged']} judged, {counts['undecodable']} undecodable, {counts['accepted']} accepted; "
        f"{sum(map(len, fault_scores.values()))} synthetic faults judged")  # fmt: skip
    reports = []
    for name, manifest in sorted(detectors.items()):
        # an age detector's threshold is the policy's cut in years (what the header's age is cut at too)
        default = cfg.policy.pediatric_age_years if manifest.kind == "age" else manifest.threshold
        current = float(cfg.policy.thresholds.get(name, default))
        clean = np.array(clean_scores[name], dtype=np.float64)
        faults = np.array(fault_scores[name], dtype=np.float64) if name in fault_scores else None
        goal = opts.recall.get(manifest.reason) if faults is not None else None
        proposed, note = propose(clean, faults, current, opts.target, goal) if len(clean) else (current, "no films")
        rep = DetectorReport(
            name=name, reason=manifest.reason, current=current, proposed=proposed,
            flag_rate_now=float(manifest.flagged(clean, current).mean()) if len(clean) else 0.0,
            flag_rate_proposed=float(manifest.flagged(clean, proposed).mean()) if len(clean) else 0.0,
            films=len(clean), goal=goal, note=note,
        )  # fmt: skip
        if faults is not None and len(faults):
            rep.faults = len(faults)
            rep.recall_now = float((faults >= current).mean())
            rep.recall_proposed = float((faults >= proposed).mean())
        reports.append(rep)
    write_config(cfg, opts, {r.name: r.proposed for r in reports if r.proposed != r.current})
    write_report(opts, reports, counts, total)
    return reports


def base_document(opts: CalibrateOptions) -> dict[str, Any]:
    if opts.base_config is None:
        return {}
    return yaml.safe_load(opts.base_config.read_text()) or {}


def write_config(cfg: Config, opts: CalibrateOptions, changed: dict[str, float]) -> None:
    """The base configuration (``--config``, or none: the defaults) with the proposed thresholds; checked by the
    gate's own parser before it is written, so a file that would not load is never left behind."""
    doc = base_document(opts)
    policy = dict(doc.get("policy") or {})
    thresholds = {**dict(policy.get("thresholds") or {}), **{k: float(v) for k, v in changed.items()}}
    policy["thresholds"] = thresholds
    doc["policy"] = policy
    parse_config(doc, source=str(opts.out))  # raises ConfigError naming the key if we made something invalid
    head = (
        f"# filmgate calibrate {opts.folder} (sample {opts.sample}, seed {opts.seed}, target false flags "
        f"{opts.target:.2%}).\n# Thresholds fitted to this site's films; the report says how: {report_path(opts)}\n"
    )
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(head + yaml.safe_dump(doc, sort_keys=False))


def report_path(opts: CalibrateOptions) -> Path:
    return opts.report or opts.out.with_suffix(".md")


def write_report(opts: CalibrateOptions, reports: Sequence[DetectorReport], counts: dict[str, int],
                 total: int) -> None:  # fmt: skip
    lines = [
        f"# Site calibration: {opts.folder}",
        "",
        f"{counts['judged']} films judged (a random sample of {total}, seed {opts.seed}); {counts['undecodable']} "
        f"undecodable; {counts['accepted']} accepted, from which the synthetic faults were made. Target: at most "
        f"{opts.target:.2%} of the "
        "site's films flagged by each detector (they are assumed clean; a real fault among them counts as a false "
        "flag). Intervals are 95 % Wilson intervals.",
        "",
        "| detector | reason | threshold now | proposed | flagged now | flagged proposed | synthetic faults | "
        "recall now | recall proposed | goal | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        def pct(rate: float | None, n: int) -> str:
            if rate is None or n == 0:
                return "-"
            lo, hi = wilson(round(rate * n), n)
            return f"{rate:.2%} ({lo:.1%}-{hi:.1%})"

        lines.append(
            f"| {r.name} | {r.reason} | {r.current:.4g} | {r.proposed:.4g} | {pct(r.flag_rate_now, r.films)} | "
            f"{pct(r.flag_rate_proposed, r.films)} | {r.faults or '-'} | {pct(r.recall_now, r.faults)} | "
            f"{pct(r.recall_proposed, r.faults)} | {f'{r.goal:.2%}' if r.goal else '-'} | {r.note} |"
        )
    lines += [
        "",
        f"Configuration written to `{opts.out}` (`policy.thresholds`); check it with "
        f"`filmgate check-config {opts.out}` and run the node with `filmgate serve --config {opts.out}`.",
        "A recall goal near 100 % needs many faults to be measured: with n faults and none missed, the interval's "
        "lower end is about 1 - 3.7/n.",
    ]
    path = report_path(opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
