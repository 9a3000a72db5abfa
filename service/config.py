"""The gate's configuration: typed, frozen, validated once at start and passed explicitly.

A hospital node must not start half-configured: every key is checked when the file is read, and an error names the
key (``listener.port``) and what is wrong with it, so the operator can fix it without reading code. Defaults are the
dataclass defaults below, so ``filmgate serve`` works with no file at all (AE ``FILMGATE`` on port 11112, metrics on
9108, spool ``var/spool``, folders ``var/out/accept`` and ``var/out/quarantine``, models from ``models/``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The destination types (each type's config class and implementation, registered once in filmgate.destinations) and
# the TLS settings (filmgate.tls) are defined beside the code that uses them; imported here for the parser and the
# checks, and so that ``filmgate.config`` names every configuration class.
# Each field's own constraint (range, allowed values, not empty) is declared beside it (``metadata=``, from
# filmgate.config_checks) and checked by typed_config.field_errors; validate() below keeps what no one field can know.
from filmgate.config_checks import (
    AE_TITLE,
    AE_TITLE_OR_ANY,
    AE_TITLES_OR_ANY,
    HOSTS,
    NOT_EMPTY,
    PORT,
    POSITIVE,
    at_least,
    between,
    check,
    check_by,
    one_of,
    relative_path_problems,
    template_fields,
)
from filmgate.destinations import DESTINATION_TYPES, DicomDestinationConfig, FolderDestinationConfig
from filmgate.tls import TLSConfig
from filmgate.typed_config import ConfigError, FrozenMap, build, field_errors, read_yaml

ENV_CONFIG = "FILMGATE_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROVIDERS = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32")
POLICY_MODES = ("enforce", "shadow")
ROLES = ("viewer", "reviewer")
CORRECTABLE_REASONS = ("rotated", "inverted", "flipped")
_MODALITY_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM code string (CS)


# ------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SenderRule:
    """Who may send: a calling AE title (``*`` for any) from one of ``hosts`` (CIDR or address; empty = any host)."""

    ae_title: str = field(default="*", metadata=AE_TITLE_OR_ANY)
    hosts: tuple[str, ...] = field(default=(), metadata=HOSTS)


def _is_uid(value: object) -> bool:
    from pydicom.uid import UID

    return isinstance(value, str) and UID(value).is_valid


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = field(default="FILMGATE", metadata=AE_TITLE)
    host: str = "0.0.0.0"
    port: int = field(default=11112, metadata=PORT)
    # associations (A-ASSOCIATE-RQ received) at once, from all senders; ... from one address, so one peer cannot take
    # every slot; TCP connections at once, associations or not (more are closed at once), from all and from one.
    max_associations: int = field(default=16, metadata=POSITIVE)
    max_associations_per_host: int = field(default=8, metadata=POSITIVE)
    max_connections: int = field(default=256, metadata=POSITIVE)
    max_connections_per_host: int = field(default=64, metadata=POSITIVE)
    acse_timeout: float = field(default=10.0, metadata=POSITIVE)  # seconds a connection has to send its A-ASSOCIATE-RQ
    network_timeout: float = field(default=60.0, metadata=POSITIVE)
    # AE titles senders may call: empty = ae_title only, ["*"] = any
    called_ae_titles: tuple[str, ...] = field(default=(), metadata=AE_TITLES_OR_ANY)
    allow_list: bool = True
    allow: tuple[SenderRule, ...] = (SenderRule("*", ("127.0.0.0/8", "::1")),)
    tls: TLSConfig = field(default_factory=TLSConfig)
    # Storage SOP Classes accepted beyond the standard ones pynetdicom knows: vendors' private classes, which a PACS
    # sends within the studies it forwards (refused, each fails the PACS's job). They are stored and judged like the
    # rest: not images, so quarantined as undecodable. Default: Siemens CSA Non-Image Storage.
    extra_storage_sop_classes: tuple[str, ...] = field(
        default=("1.3.12.2.1107.5.9.1",),
        metadata=check(_is_uid, "must be a UID (digits and dots, at most 64 characters), got {value!r}", each=True),
    )


@dataclass(frozen=True)
class SpoolConfig:
    path: str = field(default="var/spool", metadata=NOT_EMPTY)
    fsync: bool = True
    # Start the disk's writeback of a dataset every MiB while it arrives (sync_file_range), so the fdatasync before the
    # acknowledgement waits for the last MiB only. Which is faster depends on the disk and the CPU (README,
    # Benchmarks: bench/throughput measured it both ways); durability is the same either way.
    early_writeback: bool = True
    # A file under tmp/ untouched this long is the remains of an aborted transfer (a live one is written to at least
    # every listener.network_timeout): removed while the node runs, not only at the next start.
    stale_tmp_seconds: float = 3600.0
    # The reserve kept free on the spool's file system: below the larger of the two, C-STORE is answered 0xA700 (out
    # of resources) and /readyz is 503 until space is freed.
    min_free_bytes: int = field(default=512 * 1024 * 1024, metadata=at_least(0, " (0: no reserve in bytes)"))
    min_free_percent: float = field(
        default=2.0, metadata=check(lambda v: 0 <= v < 100, "must be 0-100 (a share of the volume), got {value}")
    )


@dataclass(frozen=True)
class WorkersConfig:
    """Pipeline sizing. Batching happens when several decoded films wait for inference.

    ``processes`` worker processes (0: threads inside the listener's process) claim from the spool; decoding and
    preprocessing hold the interpreter lock often enough that threads do not scale, processes do.
    """

    processes: int = field(default=2, metadata=between(0, 64, " (0 runs the workers as threads)"))
    nice: int = field(default=0, metadata=between(0, 19, " (the worker process's niceness)"))
    decode_threads: int = field(default=1, metadata=POSITIVE)
    deliver_threads: int = field(default=1, metadata=POSITIVE)
    max_batch: int = field(default=8, metadata=POSITIVE)
    batch_wait_ms: float = field(default=2.0, metadata=at_least(0))
    queue_size: int = field(default=8, metadata=POSITIVE)
    poll_interval: float = field(default=0.5, metadata=POSITIVE)
    drain_timeout: float = field(default=30.0, metadata=at_least(0))
    # first wait before a failed delivery is tried again; doubles each time, up to the max
    retry_delay: float = field(default=5.0, metadata=POSITIVE)
    retry_delay_max: float = 300.0  # at least retry_delay
    # Times one instance may be taken up (claimed) without being finished: a film a worker dies or stalls on, or one
    # no destination of its route takes. Beyond it the instance is quarantined (undecodable, with a note) or, when
    # even that cannot be delivered, moved to <spool>/dead-letter/pipeline with a note. Never retried forever.
    max_attempts: int = field(default=10, metadata=at_least(1))
    # A stage that holds one film (or batch) this long without passing it on is stalled: the watchdog starts a new
    # thread for it, hands the film back to the spool, and counts it (filmgate_stage_restarts_total).
    stall_timeout: float = 300.0  # longer than limits.decode_timeout


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one peer or one film may cost, so that hostile or broken input costs itself, never the node.

    ``max_pdu_bytes`` is the largest PDU the listener announces (A-ASSOCIATE-AC maximum length); a PDU whose header
    declares more than that plus a 64 KiB margin is refused before anything is read or allocated for it (A-ABORT).
    A dataset larger than ``max_dataset_bytes`` (as received, or once a Deflated dataset is inflated, which is done
    incrementally and stopped at the bound) and pixel data declaring more than ``max_pixels`` values (Rows x Columns
    x frames x samples, and the size a JPEG / JPEG 2000 codestream header declares) are quarantined ``undecodable``
    before anything is allocated for them. With ``decode_isolation`` each decode runs in a supervised child process
    limited to ``decode_memory_bytes`` of address space and ``decode_timeout`` seconds: a decoder that crashes, panics,
    loops or allocates without end costs its film (quarantined ``undecodable`` with a note), and the child is started
    again.
    """

    max_pdu_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=between(16 * 1024, 256 * 1024 * 1024, " (DICOM peers use 16 KiB to a few MiB)"),
    )
    max_dataset_bytes: int = field(default=1 << 30, metadata=POSITIVE)  # 1 GiB
    max_pixels: int = field(default=1 << 28, metadata=POSITIVE)  # 268,435,456 values: a 16384 x 16384 film
    decode_isolation: bool = True
    decode_timeout: float = field(default=60.0, metadata=POSITIVE)
    decode_memory_bytes: int = field(  # address space of the decode child, 4 GiB
        default=4 << 30,
        metadata=check(lambda v: v >= 512 << 20, "must be at least 536870912 (512 MiB): the decode child's "
                       "interpreter and libraries alone need that much address space, got {value}"),
    )  # fmt: skip


@dataclass(frozen=True)
class DetectorsConfig:
    models_dir: str = ""  # empty: the detectors installed with filmgate
    require: bool = True  # refuse to start without detectors (a wrong path must not mean "accept everything")
    provider: str = field(default="auto", metadata=one_of(PROVIDERS))
    intra_op_threads: int = field(default=1, metadata=at_least(0, " (0 lets onnxruntime choose)"))
    disabled: tuple[str, ...] = ()
    # auto: a manifest's int8 model on CPU where it names one; fp32: always the float model
    precision: str = field(default="auto", metadata=one_of(PRECISIONS))
    # true: detectors whose manifests name one shared graph (manifest.graph) are computed in it, once per batch;
    # false: every detector runs its own model file
    shared_graphs: bool = True


@dataclass(frozen=True)
class PolicyConfig:
    """The decision rules. Thresholds default to each manifest's; set one here to override it."""

    thresholds: Mapping[str, float] = field(
        default_factory=FrozenMap,
        metadata=check(lambda v: 0 <= v <= 1e9, "must be a non-negative number, got {value}", each=True),
    )
    modality_rule: bool = True
    # DICOM Modality codes, read in any case (validate() returns them in upper case)
    modalities: tuple[str, ...] = field(default=("CR", "DX"), metadata=check(
        lambda v: bool(_MODALITY_RE.match(str(v).strip().upper())),
        "{value!r} is not a DICOM Modality code (e.g. CR, DX)", each=True,
    ))  # fmt: skip
    pediatric_rule: bool = True
    pediatric_age_years: float = field(default=10.0, metadata=POSITIVE)
    # Order of reasons in a decision; the first one names the quarantine folder ({reason}). Facts read from the
    # header (undecodable, modality) come before model opinions: the chest detectors also fire on a CT slice.
    reason_order: tuple[str, ...] = field(default=(
        "undecodable", "detector-error", "modality", "rotated", "inverted", "flipped", "not-frontal-chest",
        "pediatric", "atypical",
    ), metadata=check(lambda v: len(set(v)) == len(v), "lists a reason twice; name each reason once"))  # fmt: skip
    # Detector reasons that only mean something on a frontal chest film: when the film's findings raise the key
    # reason, the listed detector reasons are not raised (their scores stay in the sidecar, with a note). A knee film
    # is quarantined as not-frontal-chest, not also as "flipped" or "pediatric" by detectors trained on chest films.
    # The header rules (modality, the age in the header) are never dropped.
    outranks: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: FrozenMap({"not-frontal-chest": ("flipped", "pediatric", "atypical")})
    )
    # enforce: route by the decision. shadow: decide and record everything (index, sidecars, metrics), but route every
    # film to the accept route; how a site tries the gate on its own traffic before it holds films back.
    mode: str = field(default="enforce", metadata=one_of(POLICY_MODES))


@dataclass(frozen=True)
class RoutesConfig:
    accept: tuple[str, ...] = ("accept",)
    quarantine: tuple[str, ...] = ("quarantine",)


@dataclass(frozen=True)
class HttpPublicConfig:
    """Which operational endpoints answer without a login when the review console is on (false: they need one)."""

    metrics: bool = True
    healthz: bool = True
    readyz: bool = True


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default; the container and Kubernetes configs open it (0.0.0.0)
    port: int = 9108  # checked (0-65535) with tls only when enabled, in validate()
    tls: TLSConfig = field(default_factory=TLSConfig)  # HTTPS on this port, the same settings as listener.tls
    public: HttpPublicConfig = field(default_factory=HttpPublicConfig)
    # Connections served at once (each holds a thread of the listener's process); beyond it a new connection gets
    # 503 at once and is closed. Scrapes, probes and console browsers need a handful each.
    max_connections: int = field(
        default=64, metadata=check(lambda v: v >= 1, "must be >= 1 (connections served at once), got {value}")
    )
    # Seconds a request (line, headers, body) may take to arrive, however slowly it drips, and an idle keep-alive
    # connection may wait for its next one.
    request_timeout: float = field(
        default=10.0, metadata=check(lambda v: v > 0, "must be > 0 (seconds a request may take), got {value}")
    )


@dataclass(frozen=True)
class ReviewUser:
    """A console user: ``role`` viewer (sees) or reviewer (also releases, confirms, relabels)."""

    name: str = field(
        metadata=check(
            lambda v: bool(v) and ":" not in v, "must be non-empty and without ':' (HTTP Basic), got {value!r}"
        )
    )
    role: str = field(metadata=one_of(ROLES))
    password_hash: str = field(metadata=check(  # made by `filmgate hash-password` (scrypt, salted)
        lambda v: v.startswith("scrypt$"), "not a hash made by `filmgate hash-password` (scrypt$...)"
    ))  # fmt: skip


@dataclass(frozen=True)
class ReviewConfig:
    """The review console and its API on the HTTP port (``/`` and ``/api/``)."""

    enabled: bool = False
    retention_days: float = field(  # how long the received bytes of quarantined instances are kept for release
        default=30.0, metadata=check(lambda v: v > 0, "must be > 0 (days the quarantined bytes are kept for release)")
    )
    show_patient: bool = False  # show patient name and ID in the detail view (never in the audit log)
    users: tuple[ReviewUser, ...] = ()
    session_minutes: float = field(default=480.0, metadata=POSITIVE)  # a console session ends after this long
    # failures per user name or address within login_window_seconds before throttling
    max_failed_logins: int = field(default=5, metadata=POSITIVE)
    login_window_seconds: float = field(default=300.0, metadata=POSITIVE)
    thumbnail_size: int = field(  # long side of the stored thumbnails, pixels
        default=256, metadata=check(lambda v: 32 <= v <= 1024, "must be 32-1024 pixels, got {value}")
    )


@dataclass(frozen=True)
class IndexConfig:
    """The decision index: every judged instance, in SQLite (WAL) under <spool>/state/."""

    enabled: bool = True
    retention_days: float = field(  # rows (and thumbnails) older than this are removed; 0 = keep forever
        default=365.0, metadata=check(lambda v: v >= 0, "must be >= 0 (0 keeps rows forever)")
    )


@dataclass(frozen=True)
class SyslogConfig:
    """Audit lines also to syslog; the settings below are checked only when ``enabled`` (in validate())."""

    enabled: bool = False
    address: str = "/dev/log"  # a Unix socket path, or host:port
    protocol: str = "udp"  # udp or tcp (for host:port)
    facility: int = 13  # log audit (RFC 5424 facility 13)


@dataclass(frozen=True)
class AuditConfig:
    path: str = ""  # append-only JSON lines; "" = audit.jsonl in the spool folder
    syslog: SyslogConfig = field(default_factory=SyslogConfig)


@dataclass(frozen=True)
class CorrectConfig:
    """Corrected derived films (opt-in): a film whose only reasons are among ``reasons`` gets a derived instance with
    the pixels put right, judged again, and routed to the accept destinations when it now passes."""

    enabled: bool = False
    reasons: tuple[str, ...] = field(default=CORRECTABLE_REASONS, metadata=check(
        lambda v: v in CORRECTABLE_REASONS, f"{{value!r}} cannot be corrected; choose from {list(CORRECTABLE_REASONS)}",
        each=True,
    ))  # fmt: skip
    # Detector reasons the fault itself raises (a turned or inverted chest film is often not recognised as one): a
    # film with them is corrected too, and its derived film passes only if they went away with the fault.
    also_when: tuple[str, ...] = ("not-frontal-chest",)


@dataclass(frozen=True)
class IocmConfig:
    """IOCM rejection notes (opt-in): a Key Object Selection "Rejected for Quality Reasons" per study, for the
    instances quarantined for ``reasons``, sent to the DICOM destination ``destination`` once the study is stable."""

    enabled: bool = False
    reasons: tuple[str, ...] = ("rotated", "inverted", "flipped")
    destination: str = ""


def _summary_layout_problems(layout: str) -> list[str]:
    try:
        unknown = set(template_fields(layout)) - {"StudyInstanceUID"}
    except ValueError as exc:
        return [f"bad template ({exc})", *relative_path_problems(layout)]
    known = ["only the field {StudyInstanceUID} is known to a study summary"] if unknown else []
    return known + relative_path_problems(layout)


@dataclass(frozen=True)
class StudiesConfig:
    """Study summaries, made when a study has received no instance for ``stable_seconds``."""

    enabled: bool = True
    stable_seconds: float = field(default=60.0, metadata=POSITIVE)
    summary_file: bool = False  # also write <study folder>/study-summary.json in the accept route's folders
    summary_layout: str = field(default="{StudyInstanceUID}/study-summary.json",
                                metadata=check_by(_summary_layout_problems))  # fmt: skip


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="INFO", metadata=check(
        lambda v: v.upper() in LOG_LEVELS, f"must be one of {LOG_LEVELS}, got {{value!r}}"
    ))  # fmt: skip


def _default_destinations() -> tuple[Any, ...]:
    return (
        FolderDestinationConfig(name="accept", path="var/out/accept"),
        FolderDestinationConfig(
            name="quarantine", path="var/out/quarantine", layout="{reason}/{StudyInstanceUID}/{SOPInstanceUID}.dcm"
        ),
    )


@dataclass(frozen=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    detectors: DetectorsConfig = field(default_factory=DetectorsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    destinations: tuple[FolderDestinationConfig | DicomDestinationConfig, ...] = field(
        default_factory=_default_destinations, metadata={"item_key": "name"}  # destinations.<name>.<key>
    )
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    iocm: IocmConfig = field(default_factory=IocmConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"

    @property
    def state_dir(self) -> Path:
        """The spool's state folder (decision index, review copies)."""
        return Path(self.spool.path) / "state"

    @property
    def audit_path(self) -> Path:
        return Path(self.audit.path) if self.audit.path else Path(self.spool.path) / "audit.jsonl"


# ------------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None, *, metadata_only: bool = False) -> Config:
    """Read and validate ``path`` (or ``$FILMGATE_CONFIG``; defaults when neither is given). ``metadata_only``
    (``--metadata-only``) runs without detectors: ``detectors.require`` off, the models not checked."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        return _finish(Config(), metadata_only)
    data = read_yaml(path)  # the one reader of both configurations' files (training's too)
    try:
        return _finish(_parse(data, source=str(path)), metadata_only)
    except ConfigError as exc:
        raise exc.prefixed(f"{path}: ") from exc


def parse_config(data: Any, source: str = "<dict>") -> Config:
    """A mapping (as read from YAML) -> validated :class:`Config`."""
    return validate(_parse(data, source))


def _finish(cfg: Config, metadata_only: bool) -> Config:
    if metadata_only:
        cfg = dataclasses.replace(cfg, detectors=dataclasses.replace(cfg.detectors, require=False))
    return validate(cfg, check_models=not metadata_only)


def _parse(data: Any, source: str) -> Config:
    """A mapping -> :class:`Config`, every key and type checked (every mistake reported), not yet :func:`validate`."""
    if not isinstance(data, Mapping):
        raise ConfigError("the top level must be a mapping of sections (listener, spool, ...)")
    data = dict(data)
    dests = data.pop("destinations", None)
    errors: list[str] = []
    cfg = Config()
    try:
        cfg = build(Config, data, "", skip={"destinations", "source"})
    except ConfigError as exc:
        errors.extend(exc.errors)
    if dests is not None:
        try:
            cfg = dataclasses.replace(cfg, destinations=_build_destinations(dests))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(*errors)
    return dataclasses.replace(cfg, source=source)


def _build_destinations(data: Any) -> tuple[Any, ...]:
    if not isinstance(data, Mapping):
        raise ConfigError("destinations: must be a mapping of name -> {type: folder|dicom, ...}")
    out, errors = [], []
    for name, spec in data.items():
        key = f"destinations.{name}"
        if not isinstance(spec, Mapping):
            errors.append(f"{key}: must be a mapping with a 'type' key")
            continue
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in DESTINATION_TYPES:
            errors.append(f"{key}.type: must be one of {sorted(DESTINATION_TYPES)}, got {kind!r}")
            continue
        if "name" in spec:
            errors.append(f"{key}.name: the name is the mapping key; remove 'name'")
            continue
        try:
            out.append(build(DESTINATION_TYPES[kind].config, {**spec, "name": str(name)}, key + ".", skip=set()))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(*errors)
    return tuple(out)


# ------------------------------------------------------------------------------------------------- checks


def validate(cfg: Config, *, check_models: bool = True) -> Config:
    """Every check of ``cfg``, all of them: a :class:`ConfigError` lists each mistake (one line each, naming the key
    and the fix), so an operator fixes a file in one round. First each field against the constraint declared beside
    it (:func:`filmgate.typed_config.field_errors`), then what no one field can know, here: one key against another,
    settings that only matter when their section is enabled, names that must exist (destinations, and with
    ``check_models``, off for ``--metadata-only``, the detectors and reasons of the models under
    ``detectors.models_dir``). Returns ``cfg`` with the modality codes normalised to upper case."""
    errors = field_errors(cfg)
    err = errors.append
    lst, w = cfg.listener, cfg.workers
    if lst.max_connections < lst.max_associations:
        err("listener.max_connections: must be at least listener.max_associations (every association is a "
            f"connection), got {lst.max_connections} < {lst.max_associations}")  # fmt: skip
    if lst.allow_list and not lst.allow:
        err("listener.allow: the allow-list is on but empty, so nobody could send; add a rule "
            "or set listener.allow_list: false")  # fmt: skip
    _check_tls(lst.tls, "listener.tls", err)
    if cfg.spool.stale_tmp_seconds < 2 * lst.network_timeout:
        err(f"spool.stale_tmp_seconds: must be at least twice listener.network_timeout "
            f"({2 * lst.network_timeout:g} s), or a slow live transfer could be removed")  # fmt: skip
    if w.retry_delay_max < w.retry_delay:
        err("workers.retry_delay_max: must be >= workers.retry_delay")
    if w.stall_timeout <= cfg.limits.decode_timeout:
        err(f"workers.stall_timeout: must be longer than limits.decode_timeout ({cfg.limits.decode_timeout:g} s), "
            "or a decode that is still allowed to run would count as stalled")
    policy = _check_policy(cfg, err, check_models)
    names = _check_destinations(cfg.destinations, err)
    for route in ("accept", "quarantine"):
        targets = getattr(cfg.routes, route)
        if not targets:
            err(f"routes.{route}: needs at least one destination, or instances would vanish")
        for t in targets:
            if t not in names:
                err(f"routes.{route}: unknown destination {t!r}; defined under destinations: {sorted(names)}")
    if cfg.http.enabled:  # the port and TLS of a disabled HTTP server are not looked at
        if not 0 <= cfg.http.port <= 65535:
            err(f"http.port: must be a TCP port 0-65535, got {cfg.http.port}")
        _check_tls(cfg.http.tls, "http.tls", err)
    _check_review(cfg, err)
    _check_study_features(cfg, err)
    if errors:
        raise ConfigError(*errors)
    return cfg if policy == cfg.policy else dataclasses.replace(cfg, policy=policy)


# The reasons the rules raise themselves (filmgate.policy raises them; named here because the config check needs them
# and policy imports config). Every other reason is a detector's, read from its manifest.
UNDECODABLE, MODALITY, PEDIATRIC = "undecodable", "modality", "pediatric"
DETECTOR_ERROR = "detector-error"  # the detectors failed on the film: not the film's fault, so not ``undecodable``
RULE_REASONS = (UNDECODABLE, DETECTOR_ERROR, MODALITY, PEDIATRIC)


def _check_policy(cfg: Config, err: Any, check_models: bool) -> PolicyConfig:
    """The policy's references to detectors and reasons; returns it with the modality codes normalised."""
    pol = cfg.policy
    for reason, dropped in pol.outranks.items():
        if reason in dropped:
            err(f"policy.outranks.{reason}: a reason cannot outrank itself; remove it from its list")
    if pol.modality_rule and not pol.modalities:
        err("policy.modalities: empty while policy.modality_rule is true; nothing could be accepted")
    if check_models:
        detectors = _detector_reasons(cfg.detectors, err)
        if detectors:  # none (header rules only, or the folder is wrong and said so): nothing to check names against
            _check_names(pol, cfg.detectors, detectors, err)
    modalities = tuple(str(m).strip().upper() for m in pol.modalities)
    return pol if modalities == pol.modalities else dataclasses.replace(pol, modalities=modalities)


def _detector_reasons(det: DetectorsConfig, err: Any) -> dict[str, str] | None:
    """``{detector name: reason}`` of the models under ``detectors.models_dir`` (manifests only, not the ONNX files);
    None when the folder cannot be read (the error is reported)."""
    from filmgate.manifest import ManifestError, discover_manifests, resolve_models_dir

    folder = resolve_models_dir(det.models_dir)
    shown = det.models_dir or f'"" (the installed models, {folder})'
    if not folder.is_dir():
        err(f"detectors.models_dir: folder {shown} does not exist; give the folder holding <name>/manifest.json "
            f"(\"\" = the models installed with filmgate), or for header rules only run with --metadata-only (or set "
            "detectors.require: false and an existing folder)")  # fmt: skip
        return None
    try:
        found = {m.name: m.reason for m in discover_manifests(folder)}
    except ManifestError as exc:
        err(f"detectors.models_dir: {exc}; fix or remove that model folder")
        return None
    if not found and det.require:
        err(f"detectors.models_dir: no detector (<name>/manifest.json) under {shown}; give the models folder, or "
            "for header rules only run with --metadata-only (or set detectors.require: false)")  # fmt: skip
    elif found and det.require and not set(found) - set(det.disabled):
        err(f"detectors.disabled: disables every detector under {shown}; enable one, or for header rules only run "
            "with --metadata-only (or set detectors.require: false)")  # fmt: skip
    return found


def _check_names(pol: PolicyConfig, det: DetectorsConfig, detectors: dict[str, str], err: Any) -> None:
    names = sorted(detectors)
    for i, name in enumerate(det.disabled):
        if name not in detectors:
            err(f"detectors.disabled[{i}]: no detector named {name!r}{_did_you_mean(name, names)}; detectors: {names}")
    for name in pol.thresholds:
        if name not in detectors:
            err(f"policy.thresholds.{name}: no detector named {name!r}{_did_you_mean(name, names)} (thresholds are "
                f"keyed by detector name); detectors: {names}")  # fmt: skip
    reasons = sorted({*RULE_REASONS, *detectors.values()})
    for i, reason in enumerate(pol.reason_order):
        if reason not in reasons:
            err(f"policy.reason_order[{i}]: unknown reason {reason!r}{_did_you_mean(reason, reasons)}; "
                f"reasons: {reasons}")  # fmt: skip
    for reason, dropped in pol.outranks.items():
        if reason not in reasons:
            err(f"policy.outranks.{reason}: unknown reason {reason!r}{_did_you_mean(reason, reasons)}; "
                f"reasons: {reasons}")  # fmt: skip
        for i, other in enumerate(dropped):
            if other not in reasons:
                err(f"policy.outranks.{reason}[{i}]: unknown reason {other!r}{_did_you_mean(other, reasons)}; "
                    f"reasons: {reasons}")  # fmt: skip


def _did_you_mean(word: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_destinations(dests: tuple[FolderDestinationConfig | DicomDestinationConfig, ...], err: Any) -> set[str]:
    """Names each used once (and not the node's own), and a DICOM destination's settings that go together; returns
    the names."""
    names: set[str] = set()
    for dest in dests:
        key = f"destinations.{dest.name}"
        if dest.name == "pipeline":
            err(f"{key}: the name 'pipeline' is the node's own dead-letter folder (<spool>/dead-letter/pipeline); "
                "choose another name")
        if dest.name in names:
            err(f"{key}: defined twice; give each destination its own name")
        names.add(dest.name)
        if not isinstance(dest, DicomDestinationConfig):
            continue
        if dest.backoff_max < dest.backoff_initial:
            err(f"{key}.backoff_max: must be >= backoff_initial")
        if dest.tls.enabled:
            if dest.tls.require_client_cert:
                err(f"{key}.tls.require_client_cert: means nothing for a destination (we are the client); remove "
                    "it, and give cert_file and key_file for mutual TLS")
            if bool(dest.tls.cert_file) != bool(dest.tls.key_file):
                err(f"{key}.tls: cert_file and key_file go together (our client certificate)")
            for name in ("cert_file", "key_file", "ca_file"):
                value = getattr(dest.tls, name)
                if value and not Path(value).is_file():
                    err(f"{key}.tls.{name}: file {value!r} does not exist")
    return names


def _check_study_features(cfg: Config, err: Any) -> None:
    """iocm: reasons to send a note for, a real DICOM destination for the notes, and study summaries to send them."""
    if cfg.iocm.enabled:
        if not cfg.iocm.reasons:
            err("iocm.reasons: empty while iocm.enabled is true; name the reasons that send a note")
        dicom = [d.name for d in cfg.destinations if isinstance(d, DicomDestinationConfig)]
        if cfg.iocm.destination not in dicom:
            err(f"iocm.destination: must name a destination of type dicom (the PACS that sends), got "
                f"{cfg.iocm.destination!r}; dicom destinations: {dicom or 'none'}")  # fmt: skip
        if not cfg.studies.enabled:
            err("studies.enabled: rejection notes are sent per study; set it true when iocm.enabled")


def _check_tls(tls: TLSConfig, key: str, err: Any) -> None:
    """A TLS server's settings once it is enabled: the files it needs exist, OpenSSL accepts the ciphers."""
    if not tls.enabled:
        return
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(tls.ciphers)
    except ssl.SSLError:
        err(f"{key}.ciphers: OpenSSL accepts none of {tls.ciphers!r}; use an OpenSSL cipher list "
            "(default: the BCP 195 list)")  # fmt: skip
    for name in ("cert_file", "key_file"):
        value = getattr(tls, name)
        if not value:
            err(f"{key}.{name}: required when {key}.enabled is true")
        elif not Path(value).is_file():
            err(f"{key}.{name}: file {value!r} does not exist")
    if tls.require_client_cert and not tls.ca_file:
        err(f"{key}.ca_file: required when {key}.require_client_cert is true")
    if tls.ca_file and not Path(tls.ca_file).is_file():
        err(f"{key}.ca_file: file {tls.ca_file!r} does not exist")


def _check_review(cfg: Config, err: Any) -> None:
    """The console against the index and the HTTP port it needs, its users named once; the audit's syslog once on."""
    rv = cfg.review
    if 0 < cfg.index.retention_days < rv.retention_days:
        err(f"index.retention_days: {cfg.index.retention_days:g} is shorter than review.retention_days "
            f"({rv.retention_days:g}): kept films would outlive the rows that find them; raise it or set 0")
    names = set()
    for i, user in enumerate(rv.users):
        if user.name in names:
            err(f"review.users[{i}].name: user {user.name!r} is listed twice")
        names.add(user.name)
    if rv.enabled:
        if not cfg.http.enabled:
            err("review.enabled: the console is served on the HTTP port; set http.enabled: true")
        if not cfg.index.enabled:
            err("review.enabled: the console reads the decision index; set index.enabled: true")
        if not rv.users:
            err("review.users: the console is on but nobody can log in; add a user "
                "(name, role, password_hash from `filmgate hash-password`)")  # fmt: skip
    sl = cfg.audit.syslog
    if sl.enabled:  # a disabled syslog's settings are not looked at
        if sl.protocol not in ("udp", "tcp"):
            err(f"audit.syslog.protocol: must be udp or tcp, got {sl.protocol!r}")
        if not 0 <= sl.facility <= 23:
            err(f"audit.syslog.facility: must be 0-23, got {sl.facility}")
        if not sl.address:
            err("audit.syslog.address: required when audit.syslog.enabled (a socket path or host:port)")
