"""What a ``host`` setting may say: a host name or an IP address alone.

Users paste the broker's URL (``mqtt://192.168.1.10:1883``) or ``host:port``; the
config refuses them and says which keys to write instead::

    if not is_host(value):
        raise ValueError(host_advice(value))
"""

from __future__ import annotations

import ipaddress
import re

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
TLS_SCHEMES = ("mqtts", "ssl", "tls", "tcps")


def is_host(value: str) -> bool:
    """Whether ``value`` is a host name (``broker.lan``, ``localhost``) or an IP address
    (``192.168.1.10``, ``::1``) alone: no scheme, port, user or brackets.

        >>> is_host("broker.lan"), is_host("::1"), is_host("127.0.0.1:1883"), is_host("mqtt://x")
        (True, True, False, False)
    """
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value  # (a fully qualified name may end in a dot)
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False  # digits and dots but not an IP address (192.168.1.300): no name is all digits
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def host_advice(value: str, what: str = "the broker", mqtt: bool = True) -> str:
    """Why ``value`` (not :func:`is_host`) cannot be a ``host``, and what to write instead.

    The URL form (``mqtt://host:1883``) and ``host:port`` are taken apart into the
    ``host`` and ``port`` keys the config has; a user and password in it are never
    repeated (the password belongs in ``password_file``).

        >>> host_advice("mqtt://127.0.0.1:1884")
        'not a host name or IP address: write host = "127.0.0.1" and port = 1884 (the URL form is not read here)'
    """
    text = value.strip()
    if not text:
        return f'empty: write the host name or IP address of {what}, e.g. host = "192.168.1.10"'
    scheme = ""
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
    text = text.split("/", 1)[0].split("?", 1)[0]  # a path or query after the address
    user = ""
    if "@" in text:
        userinfo, _, text = text.rpartition("@")
        user = userinfo.split(":", 1)[0]
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        close = text.find("]")
        if close > 0:
            host, rest = text[1:close], text[close + 1:]
            port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if mqtt and scheme in ("ws", "wss"):
        return ("a WebSocket URL: the gateway speaks MQTT over TCP; write the broker's host name or IP address "
                "as host and its MQTT port (1883, 8883 with TLS) as port")
    if not is_host(host) or (port and not port.isdigit()):
        return (f"not a host name or IP address: write the name or address of {what} alone, "
                f'e.g. host = "192.168.1.10"' + (", and its port as port = 1883" if mqtt else ""))
    advice = [f'host = "{host}"']
    tls = mqtt and scheme in TLS_SCHEMES
    if port or tls:
        advice.append(f"port = {int(port) if port else 8883}")
    if tls:
        advice.append("[mqtt.tls] enabled = true")
    if mqtt and user:
        advice.append(f'username = "{user}" (its password in a file named by password_file, never here)')
    said = " and ".join(advice) if len(advice) <= 2 else ", ".join(advice[:-1]) + " and " + advice[-1]
    return (f"not a host name or IP address: write {said}"
            + (" (the URL form is not read here)" if scheme else ""))
