"""The configuration file (TOML), validated by pydantic.

    >>> cfg = load_config("config/gateway.toml")
    >>> cfg.devices[0].transport
    'uart'

Unknown keys are errors, and every error names its key path and device id::

    devices[1] (id 'shed').baudrate: Input should be greater than 0

Each transport's device keys live with its link (``gateway/links/<transport>.py``).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.discovery import DiscoveryConfig
from gateway.links import LINKS
from gateway.links.base import DEVICE_ID_PATTERN, DeviceConfig, StrictModel

AnyDevice = Annotated[
    Union[tuple(link.Config for link in LINKS.values())],  # type: ignore[valid-type]
    Field(discriminator="transport"),
]


def default_gateway_id() -> str:
    """The host name, made into a valid id (``Pi-Garden.local`` -> ``pi-garden``)."""
    name = socket.gethostname().split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", name).lstrip("-_")[:64]
    return name or "gateway"


CREDENTIAL_PREFIX = "credential:"


class SecretError(Exception):
    """A password/certificate file named in the config cannot be used; the message names the key."""


class CredentialUnavailable(SecretError):
    """``credential:NAME`` outside the service: only systemd provides $CREDENTIALS_DIRECTORY."""


class TlsConfig(StrictModel):
    enabled: bool = False
    ca_file: Path | None = Field(None, description="CA certificate(s), PEM; default: the system's CAs")
    certfile: Path | None = Field(None, description="client certificate, PEM (brokers with require_certificate)")
    keyfile: Path | None = Field(None, description="the client certificate's private key, PEM")
    insecure: bool = Field(False, description="true: no certificate or host name verification (tests only)")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("tls.keyfile is set but tls.certfile is not")
        return self

    def context(self) -> ssl.SSLContext:
        """The SSL context these settings describe, files parsed; SecretError naming the
        key when a file cannot be used (missing, unreadable, not PEM, key and certificate
        not a pair)."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise SecretError(f"mqtt.tls.ca_file: cannot use {self.ca_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if self.certfile is not None:
            try:
                # An encrypted key would make OpenSSL prompt on the terminal; there is no
                # passphrase setting, so refuse it with an error instead.
                ctx.load_cert_chain(str(self.certfile), str(self.keyfile) if self.keyfile else None,
                                    password=lambda: b"")
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                try:
                    encrypted = b"ENCRYPTED" in Path(self.keyfile or self.certfile).read_bytes()
                except OSError:
                    encrypted = False
                if encrypted:
                    reason = ("the private key is encrypted; the gateway needs it without a passphrase, readable "
                              "only by its user (openssl pkey -in KEY -out NEWKEY; chmod 600 NEWKEY)")
                raise SecretError(f"mqtt.tls.certfile/keyfile: cannot use {self.certfile}: {reason}") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class MqttConfig(StrictModel):
    host: str = "localhost"
    port: int = Field(1883, gt=0, lt=65536, description="default 1883; 8883 when tls.enabled")
    base_topic: str = "pico"
    keepalive: int = Field(60, ge=5, le=3600)
    client_id: str | None = Field(None, description="default: pico-gateway-<gateway_id>")
    readings_qos: Literal[0, 1] = Field(1, description="1: acknowledged, nothing lost; 0: faster, may lose "
                                                       "what was on the wire when the connection broke")
    username: str | None = Field(None, min_length=1)
    password_file: str | None = Field(None, min_length=1, description=(
        "file holding the password (empty file: no password); 'credential:NAME' or a relative path "
        "reads $CREDENTIALS_DIRECTORY/NAME (systemd LoadCredential=)"))
    tls: TlsConfig = TlsConfig()
    password: Any = Field(None, exclude=True, repr=False)  # only to refuse it with a helpful message

    @field_validator("password")
    @classmethod
    def _no_inline_password(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("a password is never written in the config file: put it in a file (mode 0600) "
                             "and set mqtt.password_file to its path, or to 'credential:mqtt-password' "
                             "under systemd (docs/security.md)")
        return None

    @model_validator(mode="after")
    def _tls_port(self) -> MqttConfig:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set but username is not")
        if self.tls.enabled and "port" not in self.model_fields_set:
            object.__setattr__(self, "port", 8883)  # the MQTT-over-TLS port, unless the file says otherwise
        return self

    def password_path(self) -> Path | None:
        """Where the password is read from (None: no password_file)."""
        name = self.password_file
        if name is None:
            return None
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        for var in ("$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/"):
            if name.startswith(var):
                name = CREDENTIAL_PREFIX + name[len(var):]
        if name.startswith(CREDENTIAL_PREFIX):
            if not creds:
                raise CredentialUnavailable(f"mqtt.password_file: {self.password_file!r} is a systemd credential, but "
                                  "$CREDENTIALS_DIRECTORY is not set (it is, under the pico-gateway service)")
            return Path(creds) / name[len(CREDENTIAL_PREFIX):]
        path = Path(name)
        if not path.is_absolute() and creds:
            return Path(creds) / path
        return path

    def read_password(self) -> str | None:
        """The password from ``password_file``: None when unset or the file is empty.

        A trailing newline is not part of the password. The message of a SecretError
        names the key and the file, never the content."""
        path = self.password_path()
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise SecretError(f"mqtt.password_file: cannot read {path}: {reason}") from None
        text = text.rstrip("\r\n")
        return text or None

    def file_problems(self) -> tuple[list[str], list[str]]:
        """(problems, notes): every password/TLS file that is missing or unreadable, and TLS
        files that do not parse, each naming its key; notes for what only the service can check (a systemd credential)."""
        problems: list[str] = []
        notes: list[str] = []
        try:
            self.read_password()
        except CredentialUnavailable as exc:
            notes.append(f"{exc}; not checked here")
        except SecretError as exc:
            problems.append(str(exc))
        if self.tls.enabled:
            unreadable = []
            for key in ("ca_file", "certfile", "keyfile"):
                path = getattr(self.tls, key)
                if path is None:
                    continue
                try:
                    with open(path, "rb") as f:
                        f.read(1)
                except OSError as exc:
                    unreadable.append(f"mqtt.tls.{key}: cannot read {path}: {exc.strerror or exc}")
            problems += unreadable
            if not unreadable:  # readable: are they certificates and keys that fit together?
                try:
                    self.tls.context()
                except SecretError as exc:
                    problems.append(str(exc))
        return problems, notes

    @field_validator("base_topic")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        if not value or any(c in value for c in "#+\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a topic prefix without wildcards or leading/trailing '/'")
        return value


class StoreConfig(StrictModel):
    path: Path = Path("/var/lib/pico-gateway/readings.db")
    synchronous: Literal["full", "normal"] = Field(
        "full", description="full: a committed reading survives a power cut; normal: fewer flash writes, "
                            "a power cut may lose the last second")
    max_backlog_rows: int = Field(1_000_000, ge=1000, description="unpublished readings kept for publishing")
    max_backlog_hours: float = Field(168.0, gt=0, description="unpublished readings older than this are not published")
    memory_rows: int = Field(100_000, ge=100, description="readings held in memory while the database refuses writes")


class RecorderConfig(StrictModel):
    """``pico-gateway record``: a process that stores every reading of the tree (gateway/recorder.py)."""

    group: str = Field("pico-recorders", pattern=r"^[A-Za-z0-9_-]{1,64}$",
                       description="shared-subscription group: recorders of one group share the readings")
    id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)] | None = Field(
        None, description="names its client id (pico-recorder-<id>) and status topic; default: gateway_id")
    path: Path | None = Field(None, description="its own SQLite file; default: store.path")
    session_expiry_hours: float = Field(
        168.0, gt=0, le=24 * 365, description="how long the broker keeps the session (and queues readings) "
                                              "for an absent recorder")


class GatewayConfig(StrictModel):
    gateway_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)] = Field(default_factory=default_gateway_id)
    mqtt: MqttConfig = MqttConfig()
    store: StoreConfig = StoreConfig()
    diagnostics_interval: float = Field(60.0, ge=1, description="seconds between diagnostics messages")
    homeassistant: DiscoveryConfig = DiscoveryConfig()
    recorder: RecorderConfig = RecorderConfig()
    adopt_wifi_picos: bool = Field(False, description="treat unknown Pico Ws that publish a hello as wifi devices")
    devices: list[AnyDevice] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewayConfig:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"device id '{device.id}' is used twice; ids must be unique")
            seen.add(device.id)
        return self

    def device(self, device_id: str) -> DeviceConfig | None:
        return next((d for d in self.devices if d.id == device_id), None)


class ConfigError(Exception):
    """The config file cannot be used; ``problems`` lists every reason, one per line."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def report(self) -> str:
        lines = [f"{self.path}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def parse_config(data: dict[str, Any], path: str | Path = "<config>") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(err, data) for err in exc.errors()]) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a config file; raise ConfigError saying what to fix."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    return parse_config(data, path)


def load_config_or_report(path: str | Path) -> GatewayConfig | None:
    """For commands: the validated config, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None


def _describe(err: Any, data: dict[str, Any]) -> str:
    """``devices[1] (id 'shed').baudrate: <message>`` from a pydantic error."""
    loc = list(err["loc"])
    out = ""
    if loc[:1] == ["devices"] and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        raw = data.get("devices")
        device = raw[index] if isinstance(raw, list) and index < len(raw) else None
        dev_id = device.get("id") if isinstance(device, dict) else None
        out = f"devices[{index}]" + (f" (id '{dev_id}')" if dev_id else "")
        rest = loc[2:]
        # A discriminated union puts the transport name in the path: drop it.
        if rest and isinstance(device, dict) and rest[0] == device.get("transport"):
            rest = rest[1:]
        loc = rest
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key (check its spelling, and the docs for this transport)"
    elif err["type"] == "union_tag_invalid":
        message = f"unknown transport; expected one of: {', '.join(LINKS)}"
    elif err["type"] == "union_tag_not_found":
        message = f"missing 'transport' (one of: {', '.join(LINKS)})"
    return f"{out or '(top level)'}: {message}"
