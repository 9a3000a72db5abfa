"""The gate's configuration: typed, frozen, validated once at start and passed explicitly.

A hospital node must not start half-configured: every key is checked when the file is read, and an error names the
key (``listener.port``) and what is wrong with it, so the operator can fix it without reading code. Defaults are the
dataclass defaults below, so ``filmgate serve`` works with no file at all (AE ``FILMGATE`` on port 11112, metrics on
9108, spool ``var/spool``, folders ``var/out/accept`` and ``var/out/quarantine``, models from ``models/``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The destination types (each type's config class and implementation, registered once in filmgate.destinations) and
# the TLS settings (filmgate.tls) are defined beside the code that uses them; imported here for the parser and the
# checks, and so that ``filmgate.config`` names every configuration class.
from filmgate.destinations import DESTINATION_TYPES, DicomDestinationConfig, FolderDestinationConfig
from filmgate.record import LAYOUT_FIELDS  # the names a layout may use: the fields of the one instance record
from filmgate.tls import TLS_VERSIONS, TLSConfig
from filmgate.typed_config import ConfigError, FrozenMap, build, read_yaml

ENV_CONFIG = "FILMGATE_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROVIDERS = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32")
DUPLICATE_RULES = ("keep", "replace")
TRANSCODE_TARGETS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR Little Endian
POLICY_MODES = ("enforce", "shadow")
ROLES = ("viewer", "reviewer")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


# ------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SenderRule:
    """Who may send: a calling AE title (``*`` for any) from one of ``hosts`` (CIDR or address; empty = any host)."""

    ae_title: str = "*"
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "FILMGATE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16  # associations (A-ASSOCIATE-RQ received) at once, from all senders
    max_associations_per_host: int = 8  # ... from one address, so one peer cannot take every slot
    max_connections: int = 256  # TCP connections at once, associations or not; more are closed at once
    max_connections_per_host: int = 64
    acse_timeout: float = 10.0  # a connection must send its A-ASSOCIATE-RQ within this, or it is closed
    network_timeout: float = 60.0
    called_ae_titles: tuple[str, ...] = ()  # AE titles senders may call: empty = ae_title only, ["*"] = any
    allow_list: bool = True
    allow: tuple[SenderRule, ...] = (SenderRule("*", ("127.0.0.0/8", "::1")),)
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "var/spool"
    fsync: bool = True
    # A file under tmp/ untouched this long is the remains of an aborted transfer (a live one is written to at least
    # every listener.network_timeout): removed while the node runs, not only at the next start.
    stale_tmp_seconds: float = 3600.0
    # The reserve kept free on the spool's file system: below the larger of the two, C-STORE is answered 0xA700 (out
    # of resources) and /readyz is 503 until space is freed.
    min_free_bytes: int = 512 * 1024 * 1024
    min_free_percent: float = 2.0


@dataclass(frozen=True)
class WorkersConfig:
    """Pipeline sizing. Batching happens when several decoded films wait for inference.

    ``processes`` worker processes (0: threads inside the listener's process) claim from the spool; decoding and
    preprocessing hold the interpreter lock often enough that threads do not scale, processes do.
    """

    processes: int = 2
    nice: int = 0
    decode_threads: int = 1
    deliver_threads: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 2.0
    queue_size: int = 8
    poll_interval: float = 0.5
    drain_timeout: float = 30.0
    retry_delay: float = 5.0  # first wait before a failed delivery is tried again; doubles each time, up to the max
    retry_delay_max: float = 300.0
    # Times one instance may be taken up (claimed) without being finished: a film a worker dies or stalls on, or one
    # no destination of its route takes. Beyond it the instance is quarantined (undecodable, with a note) or, when
    # even that cannot be delivered, moved to <spool>/dead-letter/pipeline with a note. Never retried forever.
    max_attempts: int = 10
    # A stage that holds one film (or batch) this long without passing it on is stalled: the watchdog starts a new
    # thread for it, hands the film back to the spool, and counts it (filmgate_stage_restarts_total).
    stall_timeout: float = 300.0


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

    max_pdu_bytes: int = 4 * 1024 * 1024
    max_dataset_bytes: int = 1 << 30  # 1 GiB
    max_pixels: int = 1 << 28  # 268,435,456 values: a 16384 x 16384 film
    decode_isolation: bool = True
    decode_timeout: float = 60.0
    decode_memory_bytes: int = 4 << 30  # address space of the decode child, 4 GiB


@dataclass(frozen=True)
class DetectorsConfig:
    models_dir: str = ""  # empty: the detectors installed with filmgate
    require: bool = True  # refuse to start without detectors (a wrong path must not mean "accept everything")
    provider: str = "auto"
    intra_op_threads: int = 1
    disabled: tuple[str, ...] = ()
    precision: str = "auto"  # auto: a manifest's int8 model on CPU where it names one; fp32: always the float model


@dataclass(frozen=True)
class PolicyConfig:
    """The decision rules. Thresholds default to each manifest's; set one here to override it."""

    thresholds: Mapping[str, float] = field(default_factory=FrozenMap)
    modality_rule: bool = True
    modalities: tuple[str, ...] = ("CR", "DX")
    pediatric_rule: bool = True
    pediatric_age_years: float = 10.0
    # Order of reasons in a decision; the first one names the quarantine folder ({reason}). Facts read from the
    # header (undecodable, modality) come before model opinions: the chest detectors also fire on a CT slice.
    reason_order: tuple[str, ...] = (
        "undecodable", "detector-error", "modality", "rotated", "inverted", "flipped", "not-frontal-chest",
        "pediatric", "atypical",
    )  # fmt: skip
    # Detector reasons that only mean something on a frontal chest film: when the film's findings raise the key
    # reason, the listed detector reasons are not raised (their scores stay in the sidecar, with a note). A knee film
    # is quarantined as not-frontal-chest, not also as "flipped" or "pediatric" by detectors trained on chest films.
    # The header rules (modality, the age in the header) are never dropped.
    outranks: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: FrozenMap({"not-frontal-chest": ("flipped", "pediatric", "atypical")})
    )
    # enforce: route by the decision. shadow: decide and record everything (index, sidecars, metrics), but route every
    # film to the accept route; how a site tries the gate on its own traffic before it holds films back.
    mode: str = "enforce"


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
    port: int = 9108
    tls: TLSConfig = field(default_factory=TLSConfig)  # HTTPS on this port, the same settings as listener.tls
    public: HttpPublicConfig = field(default_factory=HttpPublicConfig)


@dataclass(frozen=True)
class ReviewUser:
    """A console user: ``role`` viewer (sees) or reviewer (also releases, confirms, relabels)."""

    name: str
    role: str
    password_hash: str  # made by `filmgate hash-password` (scrypt, salted)


@dataclass(frozen=True)
class ReviewConfig:
    """The review console and its API on the HTTP port (``/`` and ``/api/``)."""

    enabled: bool = False
    retention_days: float = 30.0  # how long the received bytes of quarantined instances are kept for release
    show_patient: bool = False  # show patient name and ID in the detail view (never in the audit log)
    users: tuple[ReviewUser, ...] = ()
    session_minutes: float = 480.0  # a console session ends after this long
    max_failed_logins: int = 5  # failures per user name or address within login_window_seconds before throttling
    login_window_seconds: float = 300.0
    thumbnail_size: int = 256  # long side of the stored thumbnails, pixels


@dataclass(frozen=True)
class IndexConfig:
    """The decision index: every judged instance, in SQLite (WAL) under <spool>/state/."""

    enabled: bool = True
    retention_days: float = 365.0  # rows (and thumbnails) older than this are removed; 0 = keep forever


@dataclass(frozen=True)
class SyslogConfig:
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
    reasons: tuple[str, ...] = ("rotated", "inverted", "flipped")
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


@dataclass(frozen=True)
class StudiesConfig:
    """Study summaries, made when a study has received no instance for ``stable_seconds``."""

    enabled: bool = True
    stable_seconds: float = 60.0
    summary_file: bool = False  # also write <study folder>/study-summary.json in the accept route's folders
    summary_layout: str = "{StudyInstanceUID}/study-summary.json"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


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
        default_factory=_default_destinations
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
    """Every cross-field, range and reference check, all of them: a :class:`ConfigError` lists each mistake (one
    line each, naming the key and the fix), so an operator fixes a file in one round. Returns ``cfg`` with the
    modality codes normalised to upper case. ``check_models`` (off for ``--metadata-only``) checks that
    ``detectors.models_dir`` holds detectors and that the detector and reason names used exist."""
    errors: list[str] = []
    err = errors.append
    lst = cfg.listener
    _check_ae(lst.ae_title, "listener.ae_title", err)
    _check_port(lst.port, "listener.port", err)
    for name in ("max_associations", "max_associations_per_host", "max_connections", "max_connections_per_host",
                 "acse_timeout", "network_timeout"):  # fmt: skip
        _positive(getattr(lst, name), f"listener.{name}", err)
    if lst.max_connections < lst.max_associations:
        err("listener.max_connections: must be at least listener.max_associations (every association is a "
            f"connection), got {lst.max_connections} < {lst.max_associations}")  # fmt: skip
    for i, title in enumerate(lst.called_ae_titles):
        if title != "*":
            _check_ae(title, f"listener.called_ae_titles[{i}]", err)
    for section, tls in (("listener.tls", lst.tls), ("http.tls", cfg.http.tls)):
        if tls.min_version not in TLS_VERSIONS:
            err(f"{section}.min_version: must be one of {TLS_VERSIONS} (BCP 195), got {tls.min_version!r}")
        if tls.enabled:
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(tls.ciphers)
            except ssl.SSLError:
                err(f"{section}.ciphers: OpenSSL accepts none of {tls.ciphers!r}; use an OpenSSL cipher list "
                    "(default: the BCP 195 list)")  # fmt: skip
    if not 16 * 1024 <= cfg.limits.max_pdu_bytes <= 256 * 1024 * 1024:
        err(f"limits.max_pdu_bytes: must be 16384-268435456 (DICOM peers use 16 KiB to a few MiB), "
            f"got {cfg.limits.max_pdu_bytes}")  # fmt: skip
    if cfg.spool.min_free_bytes < 0:
        err("spool.min_free_bytes: must be >= 0 (0: no reserve in bytes)")
    if not 0 <= cfg.spool.min_free_percent < 100:
        err(f"spool.min_free_percent: must be 0-100 (a share of the volume), got {cfg.spool.min_free_percent}")
    for i, rule in enumerate(lst.allow):
        if rule.ae_title != "*":
            _check_ae(rule.ae_title, f"listener.allow[{i}].ae_title", err)
        for j, host in enumerate(rule.hosts):
            _check_host(host, f"listener.allow[{i}].hosts[{j}]", err)
    if lst.allow_list and not lst.allow:
        err("listener.allow: the allow-list is on but empty, so nobody could send; add a rule "
            "or set listener.allow_list: false")  # fmt: skip
    _check_tls(lst.tls, "listener.tls", err)
    if not cfg.spool.path:
        err("spool.path: must not be empty")
    w = cfg.workers
    if not 0 <= w.processes <= 64:
        err(f"workers.processes: must be 0-64 (0 runs the workers as threads), got {w.processes}")
    for name in ("decode_threads", "deliver_threads", "max_batch", "queue_size"):
        _positive(getattr(w, name), f"workers.{name}", err)
    if not 0 <= w.nice <= 19:
        err(f"workers.nice: must be 0-19 (the worker process's niceness), got {w.nice}")
    for name in ("batch_wait_ms", "drain_timeout"):
        if getattr(w, name) < 0:
            err(f"workers.{name}: must be >= 0")
    if w.max_attempts < 1:
        err(f"workers.max_attempts: must be >= 1, got {w.max_attempts}")
    if w.retry_delay_max < w.retry_delay:
        err("workers.retry_delay_max: must be >= workers.retry_delay")
    if w.stall_timeout <= cfg.limits.decode_timeout:
        err(f"workers.stall_timeout: must be longer than limits.decode_timeout ({cfg.limits.decode_timeout:g} s), "
            "or a decode that is still allowed to run would count as stalled")
    for name in ("poll_interval", "retry_delay"):
        _positive(getattr(w, name), f"workers.{name}", err)
    lim = cfg.limits
    for name in ("max_dataset_bytes", "max_pixels", "decode_timeout"):
        _positive(getattr(lim, name), f"limits.{name}", err)
    if lim.decode_memory_bytes < 512 << 20:
        err("limits.decode_memory_bytes: must be at least 536870912 (512 MiB): the decode child's interpreter and "
            f"libraries alone need that much address space, got {lim.decode_memory_bytes}")  # fmt: skip
    if cfg.detectors.provider not in PROVIDERS:
        err(f"detectors.provider: must be one of {PROVIDERS}, got {cfg.detectors.provider!r}")
    if cfg.detectors.precision not in PRECISIONS:
        err(f"detectors.precision: must be one of {PRECISIONS}, got {cfg.detectors.precision!r}")
    if cfg.detectors.intra_op_threads < 0:
        err("detectors.intra_op_threads: must be >= 0 (0 lets onnxruntime choose)")
    if cfg.spool.stale_tmp_seconds < 2 * cfg.listener.network_timeout:
        err(f"spool.stale_tmp_seconds: must be at least twice listener.network_timeout "
            f"({2 * cfg.listener.network_timeout:g} s), or a slow live transfer could be removed")  # fmt: skip
    policy = _check_policy(cfg, err, check_models)
    names: set[str] = set()
    for dest in cfg.destinations:
        key = f"destinations.{dest.name}"
        if dest.name == "pipeline":
            err(f"{key}: the name 'pipeline' is the node's own dead-letter folder (<spool>/dead-letter/pipeline); "
                "choose another name")
        if dest.name in names:
            err(f"{key}: defined twice; give each destination its own name")
        names.add(dest.name)
        if isinstance(dest, FolderDestinationConfig):
            _check_layout(dest.layout, key + ".layout", err)
            if dest.duplicates not in DUPLICATE_RULES:
                err(f"{key}.duplicates: must be one of {list(DUPLICATE_RULES)}, got {dest.duplicates!r}")
            if not dest.path:
                err(f"{key}.path: must not be empty")
        else:
            _check_ae(dest.ae_title, key + ".ae_title", err)
            _check_ae(dest.calling_ae, key + ".calling_ae", err)
            _check_port(dest.port, key + ".port", err)
            if not dest.host:
                err(f"{key}.host: must not be empty")
            if dest.retries < 0:
                err(f"{key}.retries: must be >= 0")
            _positive(dest.backoff_initial, key + ".backoff_initial", err)
            _positive(dest.timeout, key + ".timeout", err)
            if dest.backoff_factor < 1:
                err(f"{key}.backoff_factor: must be >= 1")
            if dest.backoff_max < dest.backoff_initial:
                err(f"{key}.backoff_max: must be >= backoff_initial")
            for i, ts in enumerate(dest.transcode_to):
                if ts not in TRANSCODE_TARGETS:
                    err(f"{key}.transcode_to[{i}]: must be one of {list(TRANSCODE_TARGETS)} (lossless, uncompressed), "
                        f"got {ts!r}")
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
    for route in ("accept", "quarantine"):
        targets = getattr(cfg.routes, route)
        if not targets:
            err(f"routes.{route}: needs at least one destination, or instances would vanish")
        for t in targets:
            if t not in names:
                err(f"routes.{route}: unknown destination {t!r}; defined under destinations: {sorted(names)}")
    if cfg.http.enabled:
        _check_port(cfg.http.port, "http.port", err)
        _check_tls(cfg.http.tls, "http.tls", err)
    if cfg.policy.mode not in POLICY_MODES:
        err(f"policy.mode: must be one of {POLICY_MODES}, got {cfg.policy.mode!r}")
    _check_review(cfg, err)
    if cfg.logging.level.upper() not in LOG_LEVELS:
        err(f"logging.level: must be one of {LOG_LEVELS}, got {cfg.logging.level!r}")
    _validate_study_features(cfg, err)
    if errors:
        raise ConfigError(*errors)
    return cfg if policy == cfg.policy else dataclasses.replace(cfg, policy=policy)


# The reasons the rules raise themselves (filmgate.policy raises them; named here because the config check needs them
# and policy imports config). Every other reason is a detector's, read from its manifest.
UNDECODABLE, MODALITY, PEDIATRIC = "undecodable", "modality", "pediatric"
DETECTOR_ERROR = "detector-error"  # the detectors failed on the film: not the film's fault, so not ``undecodable``
RULE_REASONS = (UNDECODABLE, DETECTOR_ERROR, MODALITY, PEDIATRIC)
_MODALITY_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM code string (CS)


def _check_policy(cfg: Config, err: Any, check_models: bool) -> PolicyConfig:
    """The policy's own checks and its references to detectors and reasons; returns it with modalities normalised."""
    pol = cfg.policy
    for name, value in pol.thresholds.items():
        if not 0.0 <= value <= 1e9:
            err(f"policy.thresholds.{name}: must be a non-negative number, got {value}")
    if len(set(pol.reason_order)) != len(pol.reason_order):
        err("policy.reason_order: lists a reason twice; name each reason once")
    for reason, dropped in pol.outranks.items():
        if reason in dropped:
            err(f"policy.outranks.{reason}: a reason cannot outrank itself; remove it from its list")
    if pol.pediatric_age_years <= 0:
        err("policy.pediatric_age_years: must be > 0")
    if pol.modality_rule and not pol.modalities:
        err("policy.modalities: empty while policy.modality_rule is true; nothing could be accepted")
    modalities = tuple(str(m).strip().upper() for m in pol.modalities)
    for i, code in enumerate(modalities):
        if not _MODALITY_RE.match(code):
            err(f"policy.modalities[{i}]: {pol.modalities[i]!r} is not a DICOM Modality code (e.g. CR, DX)")
    if check_models:
        detectors = _detector_reasons(cfg.detectors, err)
        if detectors:  # none (header rules only, or the folder is wrong and said so): nothing to check names against
            _check_names(pol, cfg.detectors, detectors, err)
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


CORRECTABLE_REASONS = ("rotated", "inverted", "flipped")


def _validate_study_features(cfg: Config, err: Any) -> None:
    """correct, iocm and studies: reasons that exist, a real DICOM destination for the notes."""
    for r in cfg.correct.reasons:
        if r not in CORRECTABLE_REASONS:
            err(f"correct.reasons: {r!r} cannot be corrected; choose from {list(CORRECTABLE_REASONS)}")
    if cfg.iocm.enabled:
        if not cfg.iocm.reasons:
            err("iocm.reasons: empty while iocm.enabled is true; name the reasons that send a note")
        dicom = [d.name for d in cfg.destinations if isinstance(d, DicomDestinationConfig)]
        if cfg.iocm.destination not in dicom:
            err(f"iocm.destination: must name a destination of type dicom (the PACS that sends), got "
                f"{cfg.iocm.destination!r}; dicom destinations: {dicom or 'none'}")  # fmt: skip
        if not cfg.studies.enabled:
            err("studies.enabled: rejection notes are sent per study; set it true when iocm.enabled")
    _positive(cfg.studies.stable_seconds, "studies.stable_seconds", err)
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(cfg.studies.summary_layout) if f is not None]
    except ValueError as exc:
        err(f"studies.summary_layout: bad template ({exc})")
        names = []
    if set(names) - {"StudyInstanceUID"}:
        err("studies.summary_layout: only the field {StudyInstanceUID} is known to a study summary")
    if cfg.studies.summary_layout.startswith("/") or ".." in Path(cfg.studies.summary_layout).parts:
        err("studies.summary_layout: must be a relative path inside the destination folder")


def _check_tls(tls: TLSConfig, key: str, err: Any) -> None:
    if not tls.enabled:
        return
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
    rv = cfg.review
    if rv.retention_days <= 0:
        err("review.retention_days: must be > 0 (days the quarantined bytes are kept for release)")
    if cfg.index.retention_days < 0:
        err("index.retention_days: must be >= 0 (0 keeps rows forever)")
    elif 0 < cfg.index.retention_days < rv.retention_days:
        err(f"index.retention_days: {cfg.index.retention_days:g} is shorter than review.retention_days "
            f"({rv.retention_days:g}): kept films would outlive the rows that find them; raise it or set 0")
    _positive(rv.session_minutes, "review.session_minutes", err)
    _positive(rv.max_failed_logins, "review.max_failed_logins", err)
    _positive(rv.login_window_seconds, "review.login_window_seconds", err)
    if not 32 <= rv.thumbnail_size <= 1024:
        err(f"review.thumbnail_size: must be 32-1024 pixels, got {rv.thumbnail_size}")
    names = set()
    for i, user in enumerate(rv.users):
        key = f"review.users[{i}]"
        if not user.name or ":" in user.name:
            err(f"{key}.name: must be non-empty and without ':' (HTTP Basic), got {user.name!r}")
        if user.name in names:
            err(f"{key}.name: user {user.name!r} is listed twice")
        names.add(user.name)
        if user.role not in ROLES:
            err(f"{key}.role: must be one of {ROLES}, got {user.role!r}")
        if not user.password_hash.startswith("scrypt$"):
            err(f"{key}.password_hash: not a hash made by `filmgate hash-password` (scrypt$...)")
    if rv.enabled:
        if not cfg.http.enabled:
            err("review.enabled: the console is served on the HTTP port; set http.enabled: true")
        if not cfg.index.enabled:
            err("review.enabled: the console reads the decision index; set index.enabled: true")
        if not rv.users:
            err("review.users: the console is on but nobody can log in; add a user "
                "(name, role, password_hash from `filmgate hash-password`)")  # fmt: skip
    sl = cfg.audit.syslog
    if sl.enabled:
        if sl.protocol not in ("udp", "tcp"):
            err(f"audit.syslog.protocol: must be udp or tcp, got {sl.protocol!r}")
        if not 0 <= sl.facility <= 23:
            err(f"audit.syslog.facility: must be 0-23, got {sl.facility}")
        if not sl.address:
            err("audit.syslog.address: required when audit.syslog.enabled (a socket path or host:port)")


def _check_ae(value: str, key: str, err: Any) -> None:
    if not _AE_RE.match(value) or not value.strip():
        err(f"{key}: an AE title is 1-16 printable characters without backslash, got {value!r}")


def _check_port(value: int, key: str, err: Any) -> None:
    if not 0 <= value <= 65535:
        err(f"{key}: must be a TCP port 0-65535, got {value}")


def _positive(value: float, key: str, err: Any) -> None:
    if value <= 0:
        err(f"{key}: must be > 0, got {value}")


def _check_host(value: str, key: str, err: Any) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", value):
            err(f"{key}: must be an IP address, a CIDR network or a host name, got {value!r}")


def _check_layout(layout: str, key: str, err: Any) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(layout) if f is not None]
    except ValueError as exc:
        err(f"{key}: bad template ({exc})")
        return
    for n in names:
        if n not in LAYOUT_FIELDS:
            err(f"{key}: unknown field {{{n}}}; allowed: {', '.join(LAYOUT_FIELDS)}")
    if layout.startswith("/") or ".." in Path(layout).parts:
        err(f"{key}: must be a relative path inside the destination folder")
