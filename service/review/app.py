"""The review console and its API: routes, authentication and authorisation, pages and JSON.

Pages (session cookie): ``GET /login``, ``POST /login``, ``POST /logout``, ``GET /`` (the grid; filters as query
parameters), ``GET /static/...``. API (session cookie + ``X-CSRF-Token``, or HTTP Basic): see docs/ARCHITECTURE.md,
"Review API". Viewers read; reviewers also release, confirm and relabel. Every response carries headers that keep
the page from being framed, sniffed or cached.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import logging
import math
import re
import time
from dataclasses import replace
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from filmgate import metrics
from filmgate.http import Request, Response
from filmgate.index import Query
from filmgate.review.actions import Actions, Refused
from filmgate.review.auth import COOKIE, Authenticator, Session

log = logging.getLogger("filmgate.review")
HERE = Path(__file__).resolve().parent
_ID_ROUTE = re.compile(r"^/api/instances/(\d+)(?:/(thumbnail\.png|release|confirm|labels))?$")
PAGE_SIZES = (24, 48, 96, 192)
_SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),  # "no-referrer" would make browsers send Origin: null on form posts
    ("Content-Security-Policy", "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'"),  # fmt: skip
    ("Cache-Control", "no-store"),
]
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class Principal:
    """Who is asking, and how (``session`` needs the CSRF token on changes; ``basic`` does not: no cookie)."""

    def __init__(self, user: str, role: str, via: str, session: Session | None = None) -> None:
        self.user = user
        self.role = role
        self.via = via
        self.session = session


class ReviewApp:
    def __init__(self, cfg: Any, index: Any, recorder: Any, destinations: dict[str, Any],
                 detector_labels: dict[str, tuple[str, ...]], examine: Any = None) -> None:  # fmt: skip
        """``examine``: the judge's decode (``Judge.examine``) for thumbnails made again from the kept bytes."""
        self.cfg = cfg
        self.index = index
        self.recorder = recorder
        self.audit = recorder.audit
        self.auth = Authenticator(cfg.review)
        self.actions = Actions(cfg, index, recorder, destinations, detector_labels)
        self.detector_labels = detector_labels
        self.examine = examine
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
        metrics.declare_review()

    # ------------------------------------------------------------------------------------------ entry

    def handle(self, req: Request) -> Response:
        t0 = time.perf_counter()
        route = "api" if req.path.startswith("/api/") else "page"
        try:
            rsp = self._route(req)
        except Refused as exc:
            rsp = _json(409, {"error": str(exc)})
        except ValueError as exc:
            rsp = _json(400, {"error": str(exc)})
        except KeyError:
            rsp = _json(404, {"error": "no such instance"})
        except OSError as exc:  # a destination that cannot take the film now (disk full, folder gone): try later
            log.error("review: %s %s failed (%s)", req.method, req.path, exc)
            rsp = _json(503, {"error": f"cannot do it now: {exc.strerror or exc}; not recorded, try again"},
                        [("Retry-After", "60")])  # fmt: skip
        present = {k.lower() for k, _ in rsp.headers}
        rsp.headers.extend((k, v) for k, v in _SECURITY_HEADERS if k.lower() not in present)
        if self.cfg.http.tls.enabled:
            rsp.headers.append(("Strict-Transport-Security", "max-age=31536000"))
        metrics.HTTP_SECONDS.labels(route=route).observe(time.perf_counter() - t0)
        return rsp

    def require_login(self, req: Request) -> Response | None:
        """None when the request carries a valid login (for the operational endpoints when not public)."""
        who = self._principal(req)
        return None if isinstance(who, Principal) else who

    def _route(self, req: Request) -> Response:
        path, method = req.path, req.method
        if path == "/favicon.ico":  # browsers ask for it on every page; nothing to show, nothing to log
            return Response(204)
        if path.startswith("/static/") and method in ("GET", "HEAD"):
            return self._static(path[len("/static/"):])
        if path == "/login":
            return self._login_page(req) if method in ("GET", "HEAD") else self._login(req)
        if path == "/logout" and method == "POST":
            return self._logout(req)
        if path.startswith("/api/"):
            who = self._principal(req)
            if not isinstance(who, Principal):
                return who
            if method == "POST":
                bad = self._check_post(req, who)
                if bad is not None:
                    return bad
            return self._api(req, who)
        if path in ("/", "/studies") and method in ("GET", "HEAD"):
            who = self._principal(req, page=True)
            if not isinstance(who, Principal):
                return who
            return self._grid(req, who) if path == "/" else self._studies(req, who)
        return Response(404, b"not found\n")

    # ------------------------------------------------------------------------------------------ authentication

    def _principal(self, req: Request, page: bool = False) -> Principal | Response:
        header = req.header("Authorization")
        if header.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._unauthorised("malformed Basic credentials")
            wait = self.auth.throttle.blocked(f"user:{name}", f"addr:{req.client}")
            if wait > 0:
                metrics.LOGINS.labels(method="basic", result="throttled").inc()
                return _json(429, {"error": "too many failed logins; try again later"},
                             [("Retry-After", str(math.ceil(wait)))])  # fmt: skip
            user = self.auth.check_basic(name, password)
            if user is None:
                self.auth.throttle.failed(f"user:{name}", f"addr:{req.client}")
                metrics.LOGINS.labels(method="basic", result="failed").inc()
                self.audit.event("login-failed", **self._who_tried(name), method="basic", address=req.client)
                return self._unauthorised("wrong user name or password")
            metrics.LOGINS.labels(method="basic", result="ok").inc()
            return Principal(user.name, user.role, "basic")
        session = self.auth.session(_cookie(req, COOKIE))
        if session is not None:
            return Principal(session.user, session.role, "session", session)
        if page:
            return Response(303, b"", headers=[("Location", "/login?next=" + quote(_safe_next(req), safe=""))])
        return self._unauthorised("login required (HTTP Basic, or the console's session)")

    def _who_tried(self, name: str) -> dict[str, Any]:
        """A failed login names the user only when it is a configured one: what someone typed into the user field
        may be a password, and the audit trail must not keep it."""
        return {"user": name} if name in self.auth.users else {"user": None, "known_user": False}

    @staticmethod
    def _unauthorised(why: str) -> Response:
        return _json(401, {"error": why}, [("WWW-Authenticate", 'Basic realm="filmgate", charset="UTF-8"')])

    def _check_post(self, req: Request, who: Principal) -> Response | None:
        origin = req.header("Origin")
        if origin and not _same_origin(origin, req):
            return _json(403, {"error": "cross-origin request refused"})
        if who.via == "session":
            token = req.header("X-CSRF-Token")
            if not token or who.session is None or not _equal(token, who.session.csrf):
                return _json(403, {"error": "CSRF token missing or wrong (send X-CSRF-Token from the page)"})
        if who.role != "reviewer":
            return _json(403, {"error": f"user {who.user} is a {who.role}: only reviewers release, confirm and "
                                        "relabel"})  # fmt: skip
        return None

    def _login_page(self, req: Request, error: str = "", status: int = 200) -> Response:
        html = self.templates.get_template("login.html").render(error=error, next=_safe_next(req, "next"))
        return Response(status, html.encode(), "text/html; charset=utf-8")

    def _login(self, req: Request) -> Response:
        origin = req.header("Origin")
        if origin and not _same_origin(origin, req):
            return Response(403, b"cross-origin login refused\n")
        form = _form(req.body)
        name, password = form.get("user", ""), form.get("password", "")
        wait = self.auth.throttle.blocked(f"user:{name}", f"addr:{req.client}")
        if wait > 0:
            metrics.LOGINS.labels(method="form", result="throttled").inc()
            self.audit.event("login-throttled", **self._who_tried(name), method="form", address=req.client)
            rsp = self._login_page(req, "Too many failed logins. Try again later.", 429)
            rsp.headers.append(("Retry-After", str(math.ceil(wait))))
            return rsp
        user = self.auth.check(name, password)
        if user is None:
            self.auth.throttle.failed(f"user:{name}", f"addr:{req.client}")
            metrics.LOGINS.labels(method="form", result="failed").inc()
            self.audit.event("login-failed", **self._who_tried(name), method="form", address=req.client)
            return self._login_page(req, "Wrong user name or password.", 401)
        self.auth.throttle.succeeded(f"user:{name}")
        session = self.auth.open_session(user)
        metrics.LOGINS.labels(method="form", result="ok").inc()
        self.audit.event("login", user=user.name, role=user.role, method="form", address=req.client)
        cookie = f"{COOKIE}={session.token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(self.auth.lifetime)}"
        if req.secure:
            cookie += "; Secure"
        target = form.get("next", "/")
        target = target if target.startswith("/") and not target.startswith("//") else "/"
        return Response(303, b"", headers=[("Location", target), ("Set-Cookie", cookie)])

    def _logout(self, req: Request) -> Response:
        session = self.auth.session(_cookie(req, COOKIE))
        form = _form(req.body)
        if session is not None and _equal(form.get("csrf", ""), session.csrf):
            self.auth.close_session(session.token)
            self.audit.event("logout", user=session.user)
        expired = f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        return Response(303, b"", headers=[("Location", "/login"), ("Set-Cookie", expired)])

    # ------------------------------------------------------------------------------------------ pages

    def _static(self, name: str) -> Response:
        path = (HERE / "static" / name).resolve()
        if path.parent != (HERE / "static").resolve() or not path.is_file() or path.suffix not in _STATIC_TYPES:
            return Response(404, b"not found\n")
        return Response(200, path.read_bytes(), _STATIC_TYPES[path.suffix])

    def _grid(self, req: Request, who: Principal) -> Response:
        q = _query(req.query, default_limit=48)
        items, total = self.index.query(q)
        filters = {k: req.query.get(k, "") for k in ("outcome", "reason", "calling_ae", "since", "until",
                                                    "review_state", "detector", "min_score", "limit",
                                                    "study_instance_uid")}  # fmt: skip

        def page_link(offset: int) -> str:
            return "/?" + urlencode({**{k: v for k, v in filters.items() if v}, "offset": max(0, offset)})

        html = self.templates.get_template("grid.html").render(
            user=who.user, role=who.role, csrf=who.session.csrf if who.session else "", items=items, total=total,
            offset=q.offset, limit=q.limit, filters=filters, reasons=self.index.reasons(), senders=self.index.senders(),
            detectors=self.detector_labels, page_sizes=PAGE_SIZES,
            prev_link=page_link(q.offset - q.limit) if q.offset > 0 else "",
            next_link=page_link(q.offset + q.limit) if q.offset + q.limit < total else "",
            shadow=self.cfg.policy.mode == "shadow", show_patient=self.cfg.review.show_patient,
        )  # fmt: skip
        return Response(200, html.encode(), "text/html; charset=utf-8")

    def _studies(self, req: Request, who: Principal) -> Response:
        q = _query(req.query, default_limit=50)
        items, total = self.index.studies(q.limit, q.offset)

        def page_link(offset: int) -> str:
            return "/studies?" + urlencode({"limit": q.limit, "offset": max(0, offset)})

        html = self.templates.get_template("studies.html").render(
            user=who.user, role=who.role, csrf=who.session.csrf if who.session else "", items=items, total=total,
            offset=q.offset, limit=q.limit, prev_link=page_link(q.offset - q.limit) if q.offset > 0 else "",
            next_link=page_link(q.offset + q.limit) if q.offset + q.limit < total else "",
        )  # fmt: skip
        return Response(200, html.encode(), "text/html; charset=utf-8")

    # ------------------------------------------------------------------------------------------ API

    def _api(self, req: Request, who: Principal) -> Response:
        path, method = req.path, req.method
        if path == "/api/instances" and method in ("GET", "HEAD"):
            q = _query(req.query, default_limit=50)
            items, total = self.index.query(q)
            return _json(200, {"items": [_summary(i) for i in items], "total": total, "limit": q.limit,
                               "offset": q.offset})  # fmt: skip
        if path == "/api/labels.csv" and method in ("GET", "HEAD"):
            return self._labels_csv()
        if path == "/api/me" and method in ("GET", "HEAD"):
            return _json(200, {"user": who.user, "role": who.role, "detectors": self.detector_labels})
        if path == "/api/studies" and method in ("GET", "HEAD"):
            q = _query(req.query, default_limit=50)
            items, total = self.index.studies(q.limit, q.offset)
            return _json(200, {"items": items, "total": total, "limit": q.limit, "offset": q.offset})
        m = _ID_ROUTE.match(path)
        if m is None:
            return _json(404, {"error": "no such API route; see docs/ARCHITECTURE.md"})
        iid, action = int(m.group(1)), m.group(2)
        if action is None and method in ("GET", "HEAD"):
            return _json(200, self._detail(iid))
        if action == "thumbnail.png" and method in ("GET", "HEAD"):
            return self._thumbnail(iid)
        if method != "POST" or action in (None, "thumbnail.png"):
            return _json(405, {"error": f"{method} is not allowed here"})
        if action == "release":
            item = self.actions.release(iid, who.user)
        elif action == "confirm":
            item = self.actions.confirm(iid, who.user)
        else:
            try:
                labels = json.loads(req.body or b"null")
            except ValueError:
                raise ValueError("the body must be JSON: {detector: label}") from None
            item = self.actions.relabel(iid, labels, who.user)
        return _json(200, _summary(item))

    def _detail(self, iid: int) -> dict[str, Any]:
        item = self.index.get(iid)
        if item is None:
            raise KeyError(iid)
        out = _summary(item)
        out.update({k: item[k] for k in ("series_instance_uid", "sop_class_uid", "modality", "transfer_syntax",
                                         "peer_address", "decided_at", "delivered_at", "state", "findings", "models",
                                         "notes", "header", "error", "reviewed_by", "reviewed_at", "deliveries",
                                         "notes_log")})  # fmt: skip
        out["labels"] = self.index.labels_of(iid)
        if self.cfg.review.show_patient:
            out["patient"] = _patient(item["kept_path"])
        return out

    def _thumbnail(self, iid: int) -> Response:
        png = self.index.thumbnail(iid)
        if png is None:
            png = self._thumbnail_again(iid)
        if png is None:
            return _json(404, {"error": "no thumbnail: the film was not decodable and its bytes are not kept"})
        rsp = Response(200, png, "image/png")
        rsp.headers.append(("Cache-Control", "private, max-age=86400"))
        return rsp

    def _thumbnail_again(self, iid: int) -> bytes | None:
        """From the kept bytes through the judge's own decode (what the detectors saw), stored for next time."""
        from filmgate.records import thumbnail_png

        item = self.index.get(iid)
        if item is None:
            raise KeyError(iid)
        if self.examine is None or not item["kept"]:
            return None
        png = thumbnail_png(self.examine(Path(item["kept_path"])).pixels, self.cfg.review.thumbnail_size)
        if png:
            self.index.store_thumbnail(iid, png)
        return png

    def _labels_csv(self) -> Response:
        buf = io.StringIO()
        cols = ["file", "sop_instance_uid", "detector", "label", "user", "labelled_at", "id"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in self.index.labels():
            w.writerow({k: row[k] for k in cols})
        return Response(200, buf.getvalue().encode(), "text/csv; charset=utf-8",
                        [("Content-Disposition", 'attachment; filename="labels.csv"')])  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers


def _summary(item: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "sop_instance_uid", "study_instance_uid", "outcome", "routed", "shadow", "reasons", "scores",
            "review_state", "calling_ae", "received_at", "kept")  # fmt: skip
    out = {k: item[k] for k in keys}
    out["thumbnail"] = f"/api/instances/{item['id']}/thumbnail.png"
    return out


def _json(status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, (json.dumps(data, default=str) + "\n").encode(), "application/json", headers or [])


def _time(value: str, key: str) -> float | None:
    """Epoch seconds, or an ISO 8601 date or date-time (UTC when no zone is given)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{key}: not a date or time (ISO 8601, e.g. 2026-01-31 or 2026-01-31T08:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def _number(value: str, key: str) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{key}: not a number: {value!r}") from None


def _query(params: dict[str, str], default_limit: int) -> Query:
    try:
        limit = int(params.get("limit") or default_limit)
        offset = int(params.get("offset") or 0)
    except ValueError:
        raise ValueError("limit and offset must be integers") from None
    q = Query(limit=max(1, min(limit, 1000)), offset=max(0, offset))
    return replace(
        q, outcome=params.get("outcome", ""), reason=params.get("reason", ""),
        calling_ae=params.get("calling_ae", ""), review_state=params.get("review_state", ""),
        since=_time(params.get("since", ""), "since"), until=_time(params.get("until", ""), "until"),
        detector=params.get("detector", ""), min_score=_number(params.get("min_score", ""), "min_score"),
        max_score=_number(params.get("max_score", ""), "max_score"),
        study_instance_uid=params.get("study_instance_uid", ""),
    )  # fmt: skip


def _cookie(req: Request, name: str) -> str | None:
    raw = req.header("Cookie")
    if not raw:
        return None
    try:
        jar = SimpleCookie(raw)
    except Exception:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


def _form(body: bytes) -> dict[str, str]:
    from urllib.parse import parse_qs

    try:
        return {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        return {}


def _same_origin(origin: str, req: Request) -> bool:
    host = req.header("Host")
    scheme = "https" if req.secure else "http"
    return bool(host) and origin == f"{scheme}://{host}"


def _equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _safe_next(req: Request, param: str | None = None) -> str:
    if param is not None:
        target = req.query.get(param, "/")
    else:
        target = req.path + (("?" + urlencode(req.query)) if req.query else "")
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _patient(kept_path: str) -> dict[str, str]:
    """Patient name and ID from the kept bytes (only when review.show_patient; never stored in the index)."""
    if not kept_path or not Path(kept_path).is_file():
        return {}
    from pydicom import dcmread

    try:
        ds = dcmread(kept_path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"], force=True)
    except Exception:
        return {}
    return {"name": str(ds.get("PatientName", "") or ""), "id": str(ds.get("PatientID", "") or "")}
