"""The gate's configuration: typed, frozen, validated once at start and passed explicitly.

A hospital node must not start half-configured: every key is checked when the file is read, and an error names the
key (``listener.port``) and what is wrong with it, so the operator can fix it without reading code. Defaults are the
dataclass defaults below, so ``filmgate serve`` works with no file at all (AE ``FILMGATE`` on port 11112, metrics on
9108, spool ``var/spool``, folders ``var/out/accept`` and ``var/out/quarantine``, models from ``models/``).
"""

from __future__ import annotations

import copyreg
import dataclasses
import ipaddress
import os
import re
import string
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from filmgate.record import LAYOUT_FIELDS  # the names a layout may use: the fields of the one instance record
from filmgate.typed_config import ConfigError, build

ENV_CONFIG = "FILMGATE_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROVIDERS = ("auto", "cpu", "cuda")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


# The config travels to the worker process by pickle; read-only mappings are rebuilt from plain dicts.
copyreg.pickle(types.MappingProxyType, lambda m: (types.MappingProxyType, (dict(m),)))


# ------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SenderRule:
    """Who may send: a calling AE title (``*`` for any) from one of ``hosts`` (CIDR or address; empty = any host)."""

    ae_title: str = "*"
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS on the listener (hospital IT often requires it between sites)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "FILMGATE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    network_timeout: float = 60.0
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
    retry_delay: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one film may cost, so that a hostile or broken film costs that film, never the node.

    A dataset larger than ``max_dataset_bytes`` (as received, or once a Deflated dataset is inflated, which is done
    incrementally and stopped at the bound) and pixel data declaring more than ``max_pixels`` values (Rows x Columns
    x frames x samples, and the size a JPEG / JPEG 2000 codestream header declares) are quarantined ``undecodable``
    before anything is allocated for them. With ``decode_isolation`` each decode runs in a supervised child process
    limited to ``decode_memory_bytes`` of address space and ``decode_timeout`` seconds: a decoder that crashes, panics,
    loops or allocates without end costs its film (quarantined ``undecodable`` with a note), and the child is started
    again.
    """

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


@dataclass(frozen=True)
class PolicyConfig:
    """The decision rules. Thresholds default to each manifest's; set one here to override it."""

    thresholds: Mapping[str, float] = field(default_factory=dict)
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
        default_factory=lambda: {"not-frontal-chest": ("flipped", "pediatric", "atypical")}
    )


@dataclass(frozen=True)
class FolderDestinationConfig:
    """Write the received file and a JSON sidecar under ``path`` following ``layout``."""

    name: str
    path: str
    layout: str = "{StudyInstanceUID}/{SOPInstanceUID}.dcm"
    sidecar: bool = True
    fsync: bool = True


@dataclass(frozen=True)
class DicomDestinationConfig:
    """Forward the received bytes by C-STORE, with retries, exponential back-off and a dead-letter folder."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str = "FILMGATE"
    retries: int = 8
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 300.0
    timeout: float = 30.0
    dead_letter: str = ""  # default: <spool>/dead-letter/<name>


DESTINATION_TYPES: dict[str, type] = {"folder": FolderDestinationConfig, "dicom": DicomDestinationConfig}


@dataclass(frozen=True)
class RoutesConfig:
    accept: tuple[str, ...] = ("accept",)
    quarantine: tuple[str, ...] = ("quarantine",)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9108


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"


# ------------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate ``path`` (or ``$FILMGATE_CONFIG``; defaults when neither is given)."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        return validate(Config())
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return parse_config(data or {}, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_config(data: Any, source: str = "<dict>") -> Config:
    """A mapping (as read from YAML) -> validated :class:`Config`."""
    if not isinstance(data, Mapping):
        raise ConfigError("the top level must be a mapping of sections (listener, spool, ...)")
    data = dict(data)
    dests = data.pop("destinations", None)
    cfg = build(Config, data, "", skip={"destinations", "source"})
    if dests is not None:
        cfg = dataclasses.replace(cfg, destinations=_build_destinations(dests))
    return validate(dataclasses.replace(cfg, source=source))


def _build_destinations(data: Any) -> tuple[Any, ...]:
    if not isinstance(data, Mapping):
        raise ConfigError("destinations: must be a mapping of name -> {type: folder|dicom, ...}")
    out = []
    for name, spec in data.items():
        key = f"destinations.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}: must be a mapping with a 'type' key")
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in DESTINATION_TYPES:
            raise ConfigError(f"{key}.type: must be one of {sorted(DESTINATION_TYPES)}, got {kind!r}")
        if "name" in spec:
            raise ConfigError(f"{key}.name: the name is the mapping key; remove 'name'")
        out.append(build(DESTINATION_TYPES[kind], {**spec, "name": str(name)}, key + ".", skip=set()))
    return tuple(out)


# ------------------------------------------------------------------------------------------------- checks


def validate(cfg: Config) -> Config:
    """Cross-field and range checks; returns ``cfg`` unchanged when it is valid."""
    lst = cfg.listener
    _check_ae(lst.ae_title, "listener.ae_title")
    _check_port(lst.port, "listener.port")
    _positive(lst.max_associations, "listener.max_associations")
    _positive(lst.network_timeout, "listener.network_timeout")
    for i, rule in enumerate(lst.allow):
        if rule.ae_title != "*":
            _check_ae(rule.ae_title, f"listener.allow[{i}].ae_title")
        for j, host in enumerate(rule.hosts):
            _check_host(host, f"listener.allow[{i}].hosts[{j}]")
    if lst.allow_list and not lst.allow:
        raise ConfigError("listener.allow: the allow-list is on but empty, so nobody could send; add a rule "
                          "or set listener.allow_list: false")  # fmt: skip
    if lst.tls.enabled:
        for name in ("cert_file", "key_file"):
            value = getattr(lst.tls, name)
            if not value:
                raise ConfigError(f"listener.tls.{name}: required when listener.tls.enabled is true")
            if not Path(value).is_file():
                raise ConfigError(f"listener.tls.{name}: file {value!r} does not exist")
        if lst.tls.require_client_cert and not lst.tls.ca_file:
            raise ConfigError("listener.tls.ca_file: required when listener.tls.require_client_cert is true")
        if lst.tls.ca_file and not Path(lst.tls.ca_file).is_file():
            raise ConfigError(f"listener.tls.ca_file: file {lst.tls.ca_file!r} does not exist")
    if not cfg.spool.path:
        raise ConfigError("spool.path: must not be empty")
    w = cfg.workers
    if not 0 <= w.processes <= 64:
        raise ConfigError(f"workers.processes: must be 0-64 (0 runs the workers as threads), got {w.processes}")
    for name in ("decode_threads", "deliver_threads", "max_batch", "queue_size"):
        _positive(getattr(w, name), f"workers.{name}")
    if not 0 <= w.nice <= 19:
        raise ConfigError(f"workers.nice: must be 0-19 (the worker process's niceness), got {w.nice}")
    for name in ("batch_wait_ms", "drain_timeout"):
        if getattr(w, name) < 0:
            raise ConfigError(f"workers.{name}: must be >= 0")
    for name in ("poll_interval", "retry_delay"):
        _positive(getattr(w, name), f"workers.{name}")
    lim = cfg.limits
    for name in ("max_dataset_bytes", "max_pixels", "decode_timeout"):
        _positive(getattr(lim, name), f"limits.{name}")
    if lim.decode_memory_bytes < 512 << 20:
        raise ConfigError(
            "limits.decode_memory_bytes: must be at least 536870912 (512 MiB): the decode child's interpreter and "
            f"libraries alone need that much address space, got {lim.decode_memory_bytes}"
        )
    if cfg.detectors.provider not in PROVIDERS:
        raise ConfigError(f"detectors.provider: must be one of {PROVIDERS}, got {cfg.detectors.provider!r}")
    if cfg.detectors.intra_op_threads < 0:
        raise ConfigError("detectors.intra_op_threads: must be >= 0 (0 lets onnxruntime choose)")
    for name, value in cfg.policy.thresholds.items():
        if not 0.0 <= value <= 1e9:
            raise ConfigError(f"policy.thresholds.{name}: must be a non-negative number, got {value}")
    if len(set(cfg.policy.reason_order)) != len(cfg.policy.reason_order):
        raise ConfigError("policy.reason_order: lists a reason twice; name each reason once")
    for reason, dropped in cfg.policy.outranks.items():
        if reason in dropped:
            raise ConfigError(f"policy.outranks.{reason}: a reason cannot outrank itself; remove it from its list")
    if cfg.spool.stale_tmp_seconds < 2 * cfg.listener.network_timeout:
        raise ConfigError(
            f"spool.stale_tmp_seconds: must be at least twice listener.network_timeout "
            f"({2 * cfg.listener.network_timeout:g} s), or a slow live transfer could be removed"
        )
    if cfg.policy.pediatric_age_years <= 0:
        raise ConfigError("policy.pediatric_age_years: must be > 0")
    if cfg.policy.modality_rule and not cfg.policy.modalities:
        raise ConfigError("policy.modalities: empty while policy.modality_rule is true; nothing could be accepted")
    names = set()
    for dest in cfg.destinations:
        key = f"destinations.{dest.name}"
        if dest.name in names:
            raise ConfigError(f"{key}: defined twice")
        names.add(dest.name)
        if isinstance(dest, FolderDestinationConfig):
            _check_layout(dest.layout, key + ".layout")
            if not dest.path:
                raise ConfigError(f"{key}.path: must not be empty")
        else:
            _check_ae(dest.ae_title, key + ".ae_title")
            _check_ae(dest.calling_ae, key + ".calling_ae")
            _check_port(dest.port, key + ".port")
            if not dest.host:
                raise ConfigError(f"{key}.host: must not be empty")
            if dest.retries < 0:
                raise ConfigError(f"{key}.retries: must be >= 0")
            _positive(dest.backoff_initial, key + ".backoff_initial")
            _positive(dest.timeout, key + ".timeout")
            if dest.backoff_factor < 1:
                raise ConfigError(f"{key}.backoff_factor: must be >= 1")
            if dest.backoff_max < dest.backoff_initial:
                raise ConfigError(f"{key}.backoff_max: must be >= backoff_initial")
    for route in ("accept", "quarantine"):
        targets = getattr(cfg.routes, route)
        if not targets:
            raise ConfigError(f"routes.{route}: needs at least one destination, or instances would vanish")
        for t in targets:
            if t not in names:
                raise ConfigError(f"routes.{route}: unknown destination {t!r}; defined: {sorted(names)}")
    if cfg.http.enabled:
        _check_port(cfg.http.port, "http.port")
    if cfg.logging.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {LOG_LEVELS}, got {cfg.logging.level!r}")
    _validate_study_features(cfg)
    return cfg


CORRECTABLE_REASONS = ("rotated", "inverted", "flipped")


def _validate_study_features(cfg: Config) -> None:
    """correct, iocm and studies: reasons that exist, a real DICOM destination for the notes."""
    for r in cfg.correct.reasons:
        if r not in CORRECTABLE_REASONS:
            raise ConfigError(f"correct.reasons: {r!r} cannot be corrected; choose from {list(CORRECTABLE_REASONS)}")
    if cfg.iocm.enabled:
        if not cfg.iocm.reasons:
            raise ConfigError("iocm.reasons: empty while iocm.enabled is true; name the reasons that send a note")
        dicom = [d.name for d in cfg.destinations if isinstance(d, DicomDestinationConfig)]
        if cfg.iocm.destination not in dicom:
            raise ConfigError(
                f"iocm.destination: must name a destination of type dicom (the PACS that sends), got "
                f"{cfg.iocm.destination!r}; dicom destinations: {dicom or 'none'}"
            )
        if not cfg.studies.enabled:
            raise ConfigError("studies.enabled: rejection notes are sent per study; set it true when iocm.enabled")
    _positive(cfg.studies.stable_seconds, "studies.stable_seconds")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(cfg.studies.summary_layout) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"studies.summary_layout: bad template ({exc})") from exc
    if set(names) - {"StudyInstanceUID"}:
        raise ConfigError("studies.summary_layout: only the field {StudyInstanceUID} is known to a study summary")
    if cfg.studies.summary_layout.startswith("/") or ".." in Path(cfg.studies.summary_layout).parts:
        raise ConfigError("studies.summary_layout: must be a relative path inside the destination folder")


def _check_ae(value: str, key: str) -> None:
    if not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: an AE title is 1-16 printable characters without backslash, got {value!r}")


def _check_port(value: int, key: str) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: must be a TCP port 0-65535, got {value}")


def _positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _check_host(value: str, key: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", value):
            raise ConfigError(f"{key}: must be an IP address, a CIDR network or a host name, got {value!r}") from None


def _check_layout(layout: str, key: str) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(layout) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{key}: bad template ({exc})") from exc
    for n in names:
        if n not in LAYOUT_FIELDS:
            raise ConfigError(f"{key}: unknown field {{{n}}}; allowed: {', '.join(LAYOUT_FIELDS)}")
    if layout.startswith("/") or ".." in Path(layout).parts:
        raise ConfigError(f"{key}: must be a relative path inside the destination folder")
