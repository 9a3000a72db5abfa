"""Who may use the console: password hashes, sessions with CSRF tokens, HTTP Basic, and login throttling.

Passwords are stored as salted scrypt hashes (``hashlib.scrypt``, RFC 7914; N=2^15, r=8, p=1, 16-byte salt):
``scrypt$N$r$p$salt$hash`` (base64), made by ``filmgate hash-password``. A page login gets a random session token in
an ``HttpOnly``, ``SameSite=Strict`` cookie (``Secure`` over TLS) and a CSRF token that every state-changing request
must echo in ``X-CSRF-Token``. Scripts send HTTP Basic credentials on each request instead (no cookie, so no CSRF
token is needed); the result of a costly scrypt check is cached for a minute under a keyed digest of the credentials.
Failed logins are counted per user name and per client address; more than ``review.max_failed_logins`` in
``review.login_window_seconds`` refuses further attempts (429) until the window has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from filmgate.config import ReviewConfig, ReviewUser

N, R, P, DKLEN = 2**15, 8, 1, 32
_MAXMEM = 128 * R * N * 2
COOKIE = "filmgate_session"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=DKLEN, maxmem=_MAXMEM)
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=128 * int(r) * int(n) * 2)  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY = hash_password(secrets.token_hex(8))  # checked for unknown users, so timing does not tell names apart


@dataclass
class Session:
    token: str
    user: str
    role: str
    csrf: str
    expires: float


class Throttle:
    """Failed logins per key (user name, client address) within a sliding window."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] < now - self.window:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> float:
        """Seconds until a login may be tried again (0: now)."""
        now = time.monotonic()
        with self._lock:
            waits = [q[0] + self.window - now for k in keys if len(q := self._recent(k, now)) >= self.limit]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)
            if len(self._fails) > 10000:  # bounded memory whatever an attacker sends
                self._fails = {k: q for k, q in self._fails.items() if q and q[-1] > now - self.window}

    def succeeded(self, user_key: str) -> None:
        with self._lock:
            self._fails.pop(user_key, None)


class Authenticator:
    def __init__(self, cfg: ReviewConfig) -> None:
        self.users: dict[str, ReviewUser] = {u.name: u for u in cfg.users}
        self.lifetime = cfg.session_minutes * 60.0
        self.throttle = Throttle(cfg.max_failed_logins, cfg.login_window_seconds)
        self._sessions: dict[str, Session] = {}
        self._basic_ok: dict[bytes, float] = {}
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()

    def check(self, name: str, password: str) -> ReviewUser | None:
        """The user when the password is right (the cost is the same for unknown names)."""
        user = self.users.get(name)
        ok = verify_password(password, user.password_hash if user else _DUMMY)
        return user if ok and user is not None else None

    def check_basic(self, name: str, password: str) -> ReviewUser | None:
        key = hmac.new(self._key, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            if self._basic_ok.get(key, 0.0) > now and name in self.users:
                return self.users[name]
        user = self.check(name, password)
        if user is not None:
            with self._lock:
                if len(self._basic_ok) > 1000:
                    self._basic_ok.clear()
                self._basic_ok[key] = now + 60.0
        return user

    def open_session(self, user: ReviewUser) -> Session:
        s = Session(secrets.token_urlsafe(32), user.name, user.role, secrets.token_urlsafe(32),
                    time.time() + self.lifetime)  # fmt: skip
        with self._lock:
            now = time.time()
            self._sessions = {t: v for t, v in self._sessions.items() if v.expires > now}
            self._sessions[s.token] = s
        return s

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._sessions.get(token)
            if s is None or s.expires <= time.time():
                self._sessions.pop(token, None)
                return None
            if s.user not in self.users:
                return None
            return s

    def close_session(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)
