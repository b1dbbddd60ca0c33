"""What the broker's refusals and closures mean, said once, in plain words, and counted.

The gateway's connection (``gateway.mqtt``) hands every failure here:

- a refused password, a missing authorisation, a certificate that fails
  verification: an error saying what to check, once per streak (each retry meets
  the same answer; the repeats go to the debug log), counted (``auth_failures``,
  ``tls_failures``, ``connect_failures``);
- a broker out of reach: a warning once per distinct error;
- a client id another client uses too: mosquitto drops the older of two
  connections with one client id, silently. When the broker keeps closing ours soon
  after accepting it, the log says once that another client probably uses the id,
  naming it, then at most every KICK_REPORT seconds; the retries slow down (the will
  each drop publishes makes Home Assistant show the gateway unavailable meanwhile),
  and once a connection holds for KICK_WINDOW the log says the conflict is over.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter

from paho.mqtt.reasoncodes import ReasonCode

from gateway.backoff import Backoff
from gateway.config import MqttConfig

log = logging.getLogger("gateway.mqtt")

SESSION_TAKEN_OVER = 142  # MQTT v5 reason codes
UNSPECIFIED_ERROR = 128  # (paho's reason for a connection the broker closed without a DISCONNECT)
BAD_USER_OR_PASSWORD = 134
NOT_AUTHORIZED = 135
KICK_WINDOW = 120.0  # seconds: a connection the broker closes sooner, without a reason, may have been taken over
KICKS = 3  # such closes in a row, each followed by a connection at the first attempt: another client has our id
KICK_REPORT = 600.0  # seconds between two reports of a client id conflict that goes on


class ConnectionFailures:
    """One connection's failures: what to log, what to count, when to slow the retries."""

    def __init__(self, cfg: MqttConfig, client_id: str, stats: Counter[str], backoff: Backoff) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.stats = stats
        self.backoff = backoff
        self._failing = ""  # the last connection failure, logged once per streak
        self._refused = ""  # the broker's last refusal (credentials, TLS), logged once per streak
        self._connected_at = 0.0  # monotonic time of the last connection
        self._kicks = 0  # connections closed by the broker without a reason, soon after it accepted them, in a row
        self._kicks_unreported = 0  # of them, since the conflict was last reported
        self.conflict_reported_at: float | None = None  # when the client id conflict was last reported

    def refused(self) -> bool:
        """The broker answers but refuses us (credentials, TLS): an error said so."""
        return bool(self._refused)

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def connect_refused(self, reason: ReasonCode) -> None:
        """The broker's CONNACK refused us."""
        self.stats["connect_failures"] += 1
        self._kicks = 0  # (the broker answers, but refuses: not a connection taken over)
        where = self.where
        if reason.value == BAD_USER_OR_PASSWORD:
            self.stats["auth_failures"] += 1
            self._refusal(reason.value, "broker %s refused our user name or password (user %r, password from "
                          "mqtt.password_file%s): check both, and the broker's password_file; retrying with "
                          "backoff", where, self.cfg.username,
                          "" if self.cfg.password_file else ", which is not set")
        elif reason.value == NOT_AUTHORIZED:
            # mosquitto 2.0 answers a wrong password with this code too.
            self.stats["auth_failures"] += 1
            if self.cfg.username:
                self._refusal(reason.value, "broker %s refused user %r: not authorized (a wrong password, or a "
                              "user the broker does not know or allow): check mqtt.username, the file "
                              "mqtt.password_file names, and the broker's password_file; retrying with backoff",
                              where, self.cfg.username)
            else:
                self._refusal(reason.value, "broker %s refused an anonymous connection: not authorized; set "
                              "mqtt.username and mqtt.password_file (docs/security.md); retrying with backoff",
                              where)
        else:
            self._refusal(reason.value, "broker %s refused the connection: %s; retrying with backoff", where,
                          reason)

    def connected(self) -> None:
        """The broker accepted us: the streaks of failures end."""
        self._failing = self._refused = ""
        self._connected_at = time.monotonic()
        if not self._kicks:  # (while the broker keeps closing new connections, the retries slow down instead)
            self.backoff.reset()

    def _refusal(self, kind: object, msg: str, *args: object) -> None:
        """Log the broker's refusal (of our credentials, our TLS) as an error once per streak:
        each retry meets the same answer, and is counted; the repeats go to the debug log."""
        self._kicks = 0
        self._failing = ""
        if str(kind) != self._refused:
            self._refused = str(kind)
            log.error(msg, *args)
        else:
            log.debug(msg, *args)

    def connect_failed(self, exc: OSError) -> None:
        """A connection attempt failed before the broker answered: refused, unreachable, DNS, TLS."""
        where = self.where
        if isinstance(exc, ssl.SSLCertVerificationError):
            self.stats["tls_failures"] += 1
            self._refusal("tls verification", "TLS: the certificate of broker %s failed verification: %s; check "
                          "mqtt.tls.ca_file (%s) and that mqtt.host matches the name in the broker's certificate; "
                          "retrying with backoff", where, exc.verify_message or exc,
                          self.cfg.tls.ca_file or "the system's CAs")
        elif isinstance(exc, ssl.SSLError):
            self.stats["tls_failures"] += 1
            self._refusal("tls", "TLS handshake with broker %s failed: %s; is it a TLS listener, and does it need "
                          "a client certificate (mqtt.tls.certfile/keyfile)? retrying with backoff", where,
                          exc.reason or exc)
        else:
            self.stats["connect_failures"] += 1
            self._kicks = 0  # the broker is away: its closing our connection was not another client's doing
            self._refused = ""
            text = f"{exc}" if exc else "unknown error"
            if text != self._failing:
                self._failing = text
                log.warning("cannot reach broker %s: %s; retrying with backoff", where, text)

    def disconnected(self, was: bool, reason: ReasonCode, from_server: bool) -> None:
        """The connection ended (``was``: it had been accepted; ``from_server``: the broker
        sent a DISCONNECT)."""
        lasted = time.monotonic() - self._connected_at
        # mosquitto closes the older of two connections with one client id without a word (2.0) or
        # with "session taken over" (MQTT v5 reason 142): no DISCONNECT, "unspecified error", soon
        # after it accepted us. A broker going away looks the same, but then reconnecting fails,
        # which ends the streak (connect_failed).
        taken_over = reason.value == SESSION_TAKEN_OVER
        if taken_over or (was and reason.value == UNSPECIFIED_ERROR and lasted < KICK_WINDOW and not from_server):
            self._kicks = max(self._kicks + 1, KICKS if taken_over else 0)
        elif was:
            self._kicks = 0
            self.backoff.reset()
        if self._kicks >= KICKS:
            self.stats["client_id_conflicts"] += 1
            self._report_conflict(taken_over)
        elif was and reason.value != 0:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        if was:
            self.stats["disconnects"] += 1

    def _report_conflict(self, taken_over: bool) -> None:
        """Another client uses our client id: say so once, then every KICK_REPORT seconds at most."""
        now = time.monotonic()
        self._kicks_unreported += 1
        if self.conflict_reported_at is None:
            cause = ("the broker dropped us because another client connected with our client id %r" if taken_over
                     else f"the broker closed our connection {self._kicks} times in a row soon after accepting it: "
                          "another client is most likely connected with our client id %r (mosquitto then drops "
                          "the older connection; its log says \"Client <id> already connected, closing old "
                          "connection\")")
            log.error(cause + ". Is a second gateway running with the same gateway_id, or does another program use "
                      "this client id? Give each its own (mqtt.client_id). Each drop publishes our will, so Home "
                      "Assistant shows this gateway unavailable meanwhile; retrying less and less often (up to "
                      "every %g s)", self.client_id, self.backoff.cap)
        elif now - self.conflict_reported_at >= KICK_REPORT:
            log.error("the broker still drops our connection: %d more time(s) in the last %.0f minutes; another "
                      "client most likely uses our client id %r", self._kicks_unreported,
                      (now - self.conflict_reported_at) / 60, self.client_id)
        else:
            return
        self.conflict_reported_at = now
        self._kicks_unreported = 0

    def conflict_over(self, connected: bool) -> None:
        """After a reported client id conflict: once a connection has held for KICK_WINDOW, say it is over."""
        if connected and time.monotonic() - self._connected_at >= KICK_WINDOW:
            log.info("the connection as %r has held for %.0f s: the client id conflict is over", self.client_id,
                     KICK_WINDOW)
            self.conflict_reported_at = None
            self._kicks = self._kicks_unreported = 0
            self.backoff.reset()
