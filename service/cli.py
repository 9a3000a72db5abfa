"""``filmgate``: serve, check-config, inspect, sweep, calibrate, resend, healthcheck, hash-password."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from filmgate.clihelp import add_command, make_parser
from filmgate.config import ENV_CONFIG, Config, ConfigError, load_config
from filmgate.runtime import setup_logging


def _config(path: str | None, *, metadata_only: bool = False) -> Config:
    try:
        return load_config(path, metadata_only=metadata_only)
    except ConfigError as exc:
        n = len(exc.errors)
        lines = "".join(f"\n  {e}" for e in exc.errors)
        print(f"filmgate: invalid configuration ({n} error{'s' if n != 1 else ''}):{lines}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    # The same checks as check-config, models included: a node without detectors would accept every film, so a
    # wrong models_dir stops it here (exit 2) unless --metadata-only or detectors.require: false says so.
    cfg = _config(args.config, metadata_only=args.metadata_only)
    setup_logging(cfg.logging.level)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints every thread's stack
    from filmgate.app import serve

    try:
        return serve(cfg)
    except (RuntimeError, OSError) as exc:  # a port in use, no detectors, a worker that cannot start
        logging.getLogger("filmgate").error("cannot start: %s", exc)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args.file)
    dests = ", ".join(f"{d.name} ({type(d).__name__.replace('DestinationConfig', '').lower()})"
                      for d in cfg.destinations)  # fmt: skip
    print(f"{args.file}: OK (listener {cfg.listener.ae_title}:{cfg.listener.port}, destinations {dests})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _config(args.config, metadata_only=args.metadata_only)
    setup_logging("WARNING")
    from filmgate.inspect import inspect_files

    return inspect_files(cfg, [Path(f) for f in args.files], sys.stdout, metadata_only=args.metadata_only)


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    setup_logging("WARNING")
    from filmgate.sweep.run import SweepOptions, sweep

    pacs = None
    sources = tuple(args.sources)
    if any(s.startswith("dicom://") for s in sources):
        from filmgate.sweep.pacs import PacsError, parse_pacs

        if len(sources) != 1 or args.from_list:
            print("filmgate sweep: a dicom:// source is swept alone", file=sys.stderr)
            return 2
        try:
            pacs = parse_pacs(sources[0], query=args.query, since=args.since, ae_title=args.ae_title or
                              cfg.listener.ae_title, retrieve=args.retrieve, move_port=args.move_port)  # fmt: skip
        except PacsError as exc:
            print(f"filmgate sweep: {exc}", file=sys.stderr)
            return 2
    elif args.query or args.since:
        print("filmgate sweep: --query and --since apply to a dicom://AET@host:port source", file=sys.stderr)
        return 2
    if not sources and not args.from_list:
        print("filmgate sweep: give files or folders, --from-list FILE, or dicom://AET@host:port", file=sys.stderr)
        return 2
    missing = [s for s in sources if pacs is None and not Path(s).exists()]
    if missing:
        print(f"filmgate sweep: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    opts = SweepOptions(
        out=Path(args.out), sources=sources if pacs is None else (), from_list=args.from_list, jobs=args.jobs,
        batch=args.batch, cluster=args.cluster, sort_into=Path(args.sort_into) if args.sort_into else None,
        sort_mode=args.sort_mode, review=args.review, progress=args.progress, report_limit=args.report_limit,
        pacs=pacs,
    )  # fmt: skip
    from filmgate.sweep.pacs import PacsError

    try:
        return sweep(cfg, opts)
    except (RuntimeError, PacsError, OSError) as exc:  # no detectors, no cluster, a PACS that refuses, a full disk
        print(f"filmgate sweep: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while listing the sources (judging handles Ctrl-C itself): nothing judged is lost
        print("filmgate sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _recall_goals(items: list[str]) -> dict[str, float]:
    from filmgate.calibrate import DEFAULT_RECALL

    goals = dict(DEFAULT_RECALL)
    for item in items:
        reason, _, value = item.partition("=")
        try:
            goals[reason.strip()] = float(value)
        except ValueError:
            msg = f"filmgate calibrate: --recall takes REASON=FRACTION (e.g. rotated=0.998), not {item!r}"
            raise SystemExit(msg) from None
    return goals


def cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    setup_logging("WARNING")
    from filmgate.calibrate import CalibrateOptions, calibrate

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"filmgate calibrate: no such folder: {folder}", file=sys.stderr)
        return 2
    if not 0.0 <= args.target < 1.0:
        print("filmgate calibrate: --target is a fraction of films, e.g. 0.005 for 0.5 %", file=sys.stderr)
        return 2
    opts = CalibrateOptions(
        folder=folder, out=Path(args.out), report=Path(args.report) if args.report else None, sample=args.sample,
        seed=args.seed, target=args.target, recall=_recall_goals(args.recall), batch=args.batch,
        base_config=Path(args.config) if args.config else None,
    )  # fmt: skip
    try:
        reports = calibrate(cfg, opts, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, RuntimeError, ConfigError) as exc:
        print(f"filmgate calibrate: {exc}", file=sys.stderr)
        return 1
    for r in reports:
        change = f"{r.current:.4g} -> {r.proposed:.4g}" if r.proposed != r.current else f"{r.current:.4g} kept"
        recall = f", recall {r.recall_proposed:.2%} of {r.faults} faults" if r.recall_proposed is not None else ""
        print(f"{r.name:<12} flagged {r.flag_rate_now:.2%} -> {r.flag_rate_proposed:.2%}{recall}; {change}")
    print(f"wrote {opts.out} and {opts.report or opts.out.with_suffix('.md')}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    from filmgate.destinations import resend

    try:
        done = resend(cfg, [Path(p) for p in args.paths], to=args.to)
    except ValueError as exc:
        print(f"filmgate resend: {exc}; nothing was moved", file=sys.stderr)
        return 2
    for name, n in sorted(done.items()):
        print(f"{n} instance(s) queued again for {name} (outbox {Path(cfg.spool.path) / 'outbox' / name})")
    if not done:
        print("nothing to resend", file=sys.stderr)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    host = "127.0.0.1" if cfg.listener.host in ("0.0.0.0", "", "::") else cfg.listener.host
    ok = True
    from filmgate.listener import HEALTHCHECK_AE

    ae = AE(ae_title=HEALTHCHECK_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = args.timeout
    tls_args = None
    if cfg.listener.tls.enabled:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.listener.tls.ca_file or None)
        ctx.check_hostname = False
        if not cfg.listener.tls.ca_file:
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.listener.tls.require_client_cert:
            ctx.load_cert_chain(cfg.listener.tls.cert_file, cfg.listener.tls.key_file)
        tls_args = (ctx, None)
    assoc = ae.associate(host, cfg.listener.port, ae_title=cfg.listener.ae_title, tls_args=tls_args)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        echo = bool(status) and status.Status == 0
    else:
        echo = False
    ok &= echo
    http_ok = True
    if cfg.http.enabled:
        hhost = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "", "::") else cfg.http.host
        hctx = None
        if cfg.http.tls.enabled:  # our own port on loopback: liveness, not the certificate, is what is checked here
            import ssl

            hctx = ssl.create_default_context()
            hctx.check_hostname = False
            hctx.verify_mode = ssl.CERT_NONE
            if cfg.http.tls.require_client_cert:
                hctx.load_cert_chain(cfg.http.tls.cert_file, cfg.http.tls.key_file)
        scheme = "https" if cfg.http.tls.enabled else "http"
        try:
            url = f"{scheme}://{hhost}:{cfg.http.port}/healthz"
            with urllib.request.urlopen(url, timeout=args.timeout, context=hctx) as rsp:
                http_ok = rsp.status == 200
        except urllib.error.HTTPError as exc:  # 401: http.public.healthz is false; the process answered all the same
            http_ok = exc.code == 401
        except OSError:
            http_ok = False
    ok &= http_ok
    print(f"c-echo {'ok' if echo else 'FAILED'}, healthz {'ok' if http_ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Read a password from stdin (one line; a terminal does not echo it) and print its hash for review.users."""
    from filmgate.review.auth import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < args.min_length:
        print(f"filmgate: the password must have at least {args.min_length} characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


SERVE_KEYS = """most-changed configuration keys (every key, with its default and a comment, is in
{default_yaml}; docs/OPERATIONS.md explains pointing a PACS at the node):
  listener.ae_title      the node's AE title (default FILMGATE)
  listener.port          DICOM port (default 11112)
  listener.allow         who may send: calling AE titles and hosts (default: any AE from loopback)
  destinations           where accepted and quarantined films go (folders or DICOM nodes)
  routes.accept / routes.quarantine   which destinations get which films
  http.port              /metrics, /healthz, /readyz (default 9108)
  detectors.models_dir   the detectors ("" = the ones installed with filmgate)
Validate a file first with: filmgate check-config FILE"""


def version_text() -> str:
    """``filmgate --version``: the package version and each installed detector's name and version."""
    from importlib.metadata import PackageNotFoundError, version

    from filmgate.manifest import discover, shipped_models_dir

    try:
        own = version("filmgate")
    except PackageNotFoundError:  # a source checkout run without installing
        own = "unknown (not installed)"
    lines = [f"filmgate {own}"]
    models_dir = shipped_models_dir()
    try:
        models = discover(models_dir)
    except (OSError, ValueError) as exc:
        models = []
        lines.append(f"models: cannot read {models_dir} ({exc})")
    lines += [f"  model {m.name} {m.version} (reason {m.reason})" for _, m in models]
    if not models:
        lines.append(f"no models installed under {models_dir}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and the installed models' names and versions, then exit")  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "filmgate",
        "DICOM quality gate for chest radiographs: receives films by C-STORE, checks them with the shipped detectors "
        "and routes each to an accept or a quarantine destination.",
        ["filmgate serve --config /etc/filmgate/filmgate.yaml", "filmgate inspect film.dcm",
         "filmgate SUBCOMMAND --help"],  # fmt: skip
        "Documentation: README.md, docs/OPERATIONS.md (deployment, pointing a PACS at the node), "
        "docs/ARCHITECTURE.md.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    config_help = f"YAML configuration file (else ${ENV_CONFIG}, else the built-in defaults of service/default.yaml)"

    p = add_command(
        sub, "serve", "run the DICOM node until SIGTERM or Ctrl-C",
        description="Run the DICOM node: listener, durable spool, detectors, policy and destinations, with metrics "
        "and health on HTTP. It refuses to start (exit 2) when the configuration is invalid or no detector loads, "
        "unless --metadata-only or detectors.require: false asks for the header rules only.",
        examples=["filmgate serve", "filmgate serve --config my-site.yaml",
                  f"{ENV_CONFIG}=my-site.yaml filmgate serve"],
        more=SERVE_KEYS.format(default_yaml=Path(__file__).resolve().parent / "default.yaml"),
    )  # fmt: skip
    p.add_argument("--config", help=config_help)
    p.add_argument("--metadata-only", action="store_true",
                   help="run without detectors: only the header rules decide (sets detectors.require: false)")
    p.set_defaults(func=cmd_serve)

    p = add_command(
        sub, "check-config", "validate a configuration file without starting",
        description="Validate a configuration file as `serve` would at start, reporting every mistake at once with "
        "the key and the fix (exit 2), or a one-line summary (exit 0).",
        examples=["filmgate check-config my-site.yaml"],
    )  # fmt: skip
    p.add_argument("file", help="the YAML configuration file to check")
    p.set_defaults(func=cmd_check_config)

    p = add_command(
        sub, "inspect", "decide on DICOM/PNG/JPEG files; one JSON line per file",
        description="Run the gate's own decode, detectors and policy on files and print one JSON line per file "
        "(decision, reasons, scores). Exit 2 when no detector loads, unless --metadata-only.",
        examples=["filmgate inspect film.dcm",
                  "filmgate inspect --config my-site.yaml studies/*.dcm > decisions.jsonl"],
    )  # fmt: skip
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM, PNG or JPEG files to decide on")
    p.add_argument("--config", help=config_help + "; its detectors and policy are used")
    p.add_argument("--metadata-only", action="store_true", help="run without detectors (header rules only)")
    p.set_defaults(func=cmd_inspect)

    p = add_command(
        sub, "sweep", "judge a dataset (files, folders, a list, or a PACS) and report on it",
        description="Judge every film of the sources in parallel; results.csv, summary.json and report.html in "
        "--out. A rerun with the same --out resumes (changed files are judged again).",
        examples=["filmgate sweep /data/cxr --out runs/sweep-cxr",
                  "filmgate sweep dicom://PACS@pacs.example.org:104 --query Modality=CR,DX --since 2024-01-01 "
                  "--out runs/pacs"],
    )  # fmt: skip
    p.add_argument("sources", nargs="*", help="files and folders (recursive), or one dicom://AET@host:port")
    p.add_argument("--out", required=True, help="output folder (results, report, and the resumable state)")
    p.add_argument("--from-list", metavar="FILE", help="also judge the files named in FILE (one path a line)")
    p.add_argument("--config", help=config_help + "; its detectors and policy are used")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (0: every core)")
    p.add_argument("--batch", type=int, default=16, help="films per batch through the detectors")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="a Dask scheduler, e.g. tcp://scheduler:8786 (needs filmgate[cluster])")
    p.add_argument("--sort-into", metavar="DIR2", help="put every film into DIR2/accept/ or DIR2/quarantine/<reason>/")
    p.add_argument("--sort-mode", choices=("link", "symlink", "copy"), default="link",
                   help="how --sort-into places films (link: hard link, copy across file systems)")
    p.add_argument("--review", action="store_true", help="load the results into the review console's index")
    p.add_argument("--report-limit", type=int, default=500, help="films per contact sheet in report.html")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--query", help="PACS: C-FIND keys, e.g. 'Modality=CR,DX' (comma: any of)")
    p.add_argument("--since", help="PACS: studies from this date on (YYYY-MM-DD)")
    p.add_argument("--ae-title", help="PACS: our calling AE title (default: listener.ae_title)")
    p.add_argument("--retrieve", choices=("get", "move"), default="get",
                   help="PACS: C-GET or C-MOVE to our own AE title (move needs --move-port)")
    p.add_argument("--move-port", type=int, default=0, help="PACS: port our C-MOVE destination listens on")
    p.set_defaults(func=cmd_sweep)
    p = add_command(
        sub, "calibrate", "fit the detectors' thresholds to a site's own films; writes a config override and a report",
        description="Judge a random sample of a site's films (assumed mostly clean) and synthetic faults made from "
        "the accepted ones (rotations, inversions, mirrors); propose policy.thresholds that bring each detector's "
        "false flags to --target without its recall on the faults falling below its goal. Never touches the models.",
        examples=["filmgate calibrate /data/site-sample --out site.yaml",
                  "filmgate calibrate /data/site-sample --out site.yaml --config filmgate.yaml --sample 2000 "
                  "--target 0.003",
                  "filmgate check-config site.yaml && filmgate serve --config site.yaml"],
    )  # fmt: skip
    p.add_argument("folder", help="a folder of the site's DICOM, PNG or JPEG films (recursive)")
    p.add_argument("--out", required=True, help="the configuration file to write (the --config given, or the "
                   "defaults, with policy.thresholds set)")  # fmt: skip
    p.add_argument("--report", help="the Markdown report (default: --out with .md)")
    p.add_argument("--config", help="the site's configuration to start from (models, policy, destinations)")
    p.add_argument("--sample", type=int, default=500, help="films judged, chosen at random (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    p.add_argument("--target", type=float, default=0.005, help="largest fraction of the site's films each detector "
                   "may flag")  # fmt: skip
    p.add_argument("--recall", action="append", default=[], metavar="REASON=FRACTION",
                   help="recall goal on the synthetic faults (defaults rotated=0.998, inverted=0.9995, flipped=0.98)")
    p.add_argument("--batch", type=int, default=16, help="films per batch through the detectors")
    p.set_defaults(func=cmd_calibrate)

    p = add_command(
        sub, "resend", "put dead letters back into their DICOM destination's outbox",
        description="Queue dead-lettered instances (files, or every .dcm of folders) again for the DICOM destination "
        "named in each file's note (or --to). The running node sends them with a fresh retry count; the notes are "
        "removed. Exit 2, with nothing moved, when a file has no known destination.",
        examples=["filmgate resend --config my-site.yaml var/spool/dead-letter/research-pacs",
                  "filmgate resend --config my-site.yaml --to research-pacs lost/*.dcm"],
    )  # fmt: skip
    p.add_argument("paths", nargs="+", metavar="DEAD-LETTER-FOLDER|FILE", help="dead letters: folders or files")
    p.add_argument("--config", help=config_help + "; its spool and destinations are used")
    p.add_argument("--to", metavar="DESTINATION", help="queue them for this destination, whatever their notes say")
    p.set_defaults(func=cmd_resend)

    p = add_command(
        sub, "healthcheck", "C-ECHO the node and GET /healthz; exit 0 when both answer",
        description="Check a running node: a DICOM C-ECHO to the listener and GET /healthz on the HTTP port, with "
        "the addresses from the configuration. The container image's health check runs this.",
        examples=["filmgate healthcheck", "filmgate healthcheck --config my-site.yaml --timeout 2"],
    )  # fmt: skip
    p.add_argument("--config", help=config_help)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    p.set_defaults(func=cmd_healthcheck)

    p = add_command(
        sub, "hash-password", "read a password from stdin, print its scrypt hash for review.users",
        description="Read one password from stdin (not echoed on a terminal) and print a salted scrypt hash to put "
        "in review.users[].password_hash. The password itself is never stored or printed.",
        examples=["filmgate hash-password", "printf '%s\\n' \"$PASSWORD\" | filmgate hash-password"],
    )  # fmt: skip
    p.add_argument("--min-length", type=int, default=10, help="refuse shorter passwords")
    p.set_defaults(func=cmd_hash_password)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from filmgate import patches

    try:
        patches.install()  # the library changes filmgate depends on, checked against the installed versions
    except patches.PatchError as exc:
        print(f"filmgate: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a socket or pipe of the command's own, not our output
        # `filmgate inspect *.dcm | head`: the reader has what it wanted. Stop as Unix tools do on SIGPIPE, without a
        # traceback, and point stdout at /dev/null so the interpreter's last flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_reader_gone(fd: int | None = None) -> bool:
    """Whether stdout (or ``fd``) is a pipe or socket whose reading end is closed: poll reports an error on its
    writing end."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno() if fd is None else fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout at all
        return False


if __name__ == "__main__":
    raise SystemExit(main())
