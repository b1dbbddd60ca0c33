"""The configuration file (TOML), validated by pydantic.

    cfg = load_config("config/gateway.toml")
    cfg.devices[0].transport            # 'uart'

Unknown keys are errors, and every error names its key path and device id::

    devices[1] (id 'shed').baudrate: Input should be greater than 0

and says what to write instead where it can (``did you mean 'baudrate'?``,
``write host = "127.0.0.1" and port = 1883``). :func:`load_runnable`, for
``check-config`` and ``run``, adds what the file alone does not show but ``run``
would fail on (:func:`runtime_problems`: the password and TLS files, the
database's folder, the devices' addresses), so that ``run`` stops before it
starts anything, with exit status 2, the one systemd does not restart on.

Each transport's device keys live with its link (``gateway/links/<transport>.py``);
the machine's checks are in :mod:`gateway.config_checks`, the wording of errors in
:mod:`gateway.config_messages`.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.config_checks import runtime_problems
from gateway.config_messages import describe
from gateway.discovery import DiscoveryConfig
from gateway.domain import DEVICE_ID_PATTERN, RECORDER_GROUP_PATTERN, StrictModel
from gateway.hosts import host_advice, is_host
from gateway.links import LINKS, PluginError, load_plugin
from gateway.links.base import DeviceConfig
from gateway.links.i2c import I2cConfig
from gateway.links.tcp import TcpConfig
from gateway.links.uart import UartConfig
from gateway.links.usb import UsbConfig
from gateway.links.wifi import WifiConfig

BuiltinDevice = UartConfig | WifiConfig | TcpConfig | I2cConfig | UsbConfig
"""The device configs of the gateway's own links (tests/test_links_registry.py holds this
equal to the registry's built-ins)."""


def validate_device(value: Any) -> DeviceConfig:
    """A ``[[devices]]`` table validated by its transport's config model, found in LINKS
    when it is validated: a transport a plugin registered validates like a built-in one."""
    if isinstance(value, DeviceConfig):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("device_type", "a device is a [[devices]] table with a transport key")
    transport = value.get("transport")
    if transport is None:
        raise PydanticCustomError("union_tag_not_found", "missing 'transport'")
    link = LINKS.get(transport) if isinstance(transport, str) else None
    if link is None:
        raise PydanticCustomError("union_tag_invalid", "unknown transport {transport!r}", {"transport": transport})
    return link.Config.model_validate(value)


def _by_transport(value: Any, handler: ValidatorFunctionWrapHandler) -> DeviceConfig:
    return validate_device(value)  # (not handler: the static union does not know the plugins' links)


AnyDevice = Annotated[SerializeAsAny[BuiltinDevice | DeviceConfig], WrapValidator(_by_transport)]
"""A device of any registered transport: statically one of the built-in configs or, for a
plugin's link, a DeviceConfig; validated by :func:`validate_device`, written out whole
(a plugin's keys too)."""


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
                # The key is in keyfile, or in certfile after the certificate when keyfile is unset.
                key, key_path = ("keyfile", self.keyfile) if self.keyfile else ("certfile", self.certfile)
                try:
                    encrypted = b"ENCRYPTED" in Path(key_path).read_bytes()
                except OSError:
                    encrypted = False
                if encrypted:
                    raise SecretError(
                        f"mqtt.tls.{key}: cannot use {key_path}: the private key is encrypted; the gateway needs "
                        "it without a passphrase, readable only by its user (openssl pkey -in KEY -out NEWKEY; "
                        "chmod 600 NEWKEY)") from None
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
        files that do not parse, each naming its key; notes for what only the service can
        check (a systemd credential)."""
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
            raise ValueError("must be a topic prefix without wildcards or leading/trailing '/', e.g. \"pico\"")
        if value.startswith("$"):  # the broker refuses publishes there ($SYS), or reads it as $share/...
            raise ValueError("topics starting with '$' are the broker's own: choose another prefix, e.g. \"pico\"")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not is_host(value):
            raise ValueError(host_advice(value))
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            # An empty id makes the broker pick a new one at each connection: no will of ours, no session.
            raise ValueError("empty: leave the key out for the default, pico-gateway-<gateway_id>")
        return value


class StoreConfig(StrictModel):
    path: Path = Path("/var/lib/pico-gateway/readings.db")
    synchronous: Literal["full", "normal"] = Field(
        "full", description="full: a committed reading survives a power cut; normal: fewer flash writes, "
                            "a power cut may lose the last second")
    max_backlog_rows: int = Field(1_000_000, ge=1000, description="unpublished readings kept for publishing")
    max_backlog_hours: float = Field(168.0, gt=0, description="unpublished readings older than this are not published")
    memory_rows: int = Field(100_000, ge=100, description="readings held in memory while the database refuses writes")
    commit_interval: float = Field(
        0.01, ge=0.0, le=60.0, description="seconds between commits under load: a power cut loses at most this "
                                           "much (Picos with acks send it again); longer means fewer flash writes")
    keep_raw_days: float = Field(30.0, gt=0, description="raw readings older than this are rolled up "
                                                         "(per minute and per hour) and deleted")
    keep_rollups_days: float | Literal["forever"] = Field(
        3650.0, description='roll-ups older than this are deleted; "forever" keeps them')
    max_size_mb: float | None = Field(
        None, ge=1, description="when the database would pass this size, the oldest raw readings go first "
                                "(rolled up before)")

    @field_validator("keep_rollups_days")
    @classmethod
    def _positive_or_forever(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and v <= 0:
            raise ValueError('must be more than 0 days, or "forever"')
        return v


class RecorderConfig(StrictModel):
    """``pico-gateway record``: a process that stores every reading of the tree (gateway/recorder.py)."""

    group: str = Field("pico-recorders", pattern=RECORDER_GROUP_PATTERN,
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
    plugins: list[str] = Field([], description="modules (or .py files, from the config's folder) that register "
                                               "links of their own (docs/links.md)")
    devices: list[AnyDevice] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewayConfig:
        seen: dict[str, int] = {}
        for index, device in enumerate(self.devices):
            if device.id in seen:
                raise ValueError(f"device id '{device.id}' is used twice (devices[{seen[device.id]}] and "
                                 f"devices[{index}]); ids must be unique")
            seen[device.id] = index
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


def load_plugins(data: dict[str, Any], path: str | Path) -> list[str]:
    """Import the modules the config's ``plugins`` names (relative paths from the config's
    folder), before its devices are read; the problems, each naming its entry."""
    names = data.get("plugins", [])
    if not isinstance(names, list):
        return []  # (the validation says what is wrong with it)
    folder = Path(path).parent if str(path) != "<config>" else Path.cwd()
    problems = []
    for index, name in enumerate(names):
        if isinstance(name, str):
            try:
                load_plugin(name, folder)
            except PluginError as exc:
                problems.append(f"plugins[{index}]: {exc}")
    return problems


def parse_config(data: dict[str, Any], path: str | Path = "<config>") -> GatewayConfig:
    plugin_problems = load_plugins(data, path)
    if plugin_problems:
        raise ConfigError(path, plugin_problems)
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [describe(err, data, GatewayConfig) for err in exc.errors()]) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The file's TOML, not validated; ConfigError when it cannot be read or is not TOML."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a config file; raise ConfigError saying what to fix."""
    return parse_config(read_toml(path), path)


def load_config_or_report(path: str | Path) -> GatewayConfig | None:
    """For commands: the validated config, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None


def _valid_parts(data: dict[str, Any]) -> tuple[MqttConfig | None, StoreConfig | None, list[tuple[int, DeviceConfig]]]:
    """The sections of a file that does not validate as a whole which do alone: their
    runtime problems are reported with the file's, so that one round of fixes is enough."""
    def valid(validate: Any, value: Any) -> Any:
        try:
            return validate(value)
        except (ValidationError, PydanticCustomError, TypeError):
            return None

    mqtt = valid(MqttConfig.model_validate, data.get("mqtt", {}))
    store = valid(StoreConfig.model_validate, data.get("store", {}))
    raw = data.get("devices", [])
    devices = [(index, valid(validate_device, device)) for index, device in
               enumerate(raw if isinstance(raw, list) else [])]
    return mqtt, store, [(index, device) for index, device in devices if device is not None]


def load_runnable(path: str | Path, running: bool) -> tuple[GatewayConfig, list[str]]:
    """The config at ``path`` and its notes, if ``run`` can use it; else ConfigError listing
    every problem: the file's validation, then :func:`runtime_problems`. Used by both
    ``check-config`` and ``run``, which refuse a config with problems (exit 2)."""
    data = read_toml(path)
    try:
        config = parse_config(data, path)
    except ConfigError as exc:
        mqtt, store, devices = _valid_parts(data)
        extra, _ = runtime_problems(mqtt.file_problems() if mqtt else None, store.path if store else None,
                                    devices, running=running)
        raise ConfigError(path, exc.problems + extra) from None
    problems, notes = runtime_problems(config.mqtt.file_problems(), config.store.path,
                                       list(enumerate(config.devices)), running)
    if problems:
        raise ConfigError(path, problems)
    return config, notes
