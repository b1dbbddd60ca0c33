"""``pico-gateway install-service`` / ``uninstall-service``: the gateway as a systemd service.

install (as root):
  1. a system user ``pico-gateway`` (no home, no login shell), in the device groups
     that exist here (dialout, i2c, plugdev);
  2. a virtualenv at ``<prefix>/venv`` with the package installed (not editable)
     from the source tree;
  3. ``<etc>/gateway.toml`` from ``config/gateway.toml`` only when there is none
     (an existing config is never overwritten), and an empty ``<etc>/mqtt-password``
     (the credential file the unit loads) when there is none;
  4. the unit file, ``systemctl daemon-reload``, ``enable`` and ``restart``.
uninstall stops and disables the service, removes the unit and the venv, and
keeps the config, the credential, the readings in /var/lib/pico-gateway and the user.

Every path is a parameter and every command goes through ``run``; with ``root``
set the whole plan lands under that directory (tests), without the root check.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SERVICE = "pico-gateway.service"
USER = "pico-gateway"
DEVICE_GROUPS = ("dialout", "i2c", "plugdev")
STATE_DIR = "/var/lib/pico-gateway"
DEFAULT_PREFIX = "/opt/pico-gateway"
DEFAULT_ETC = "/etc/pico-gateway"
DEFAULT_UNIT_DIR = "/etc/systemd/system"

Run = Callable[..., Any]
Out = Callable[[str], None]


class ServiceError(Exception):
    """Installation cannot go on; the message says why and what to do."""


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def default_source_dir() -> Path:
    """The source tree this package runs from (a clone with ``pyproject.toml``)."""
    return Path(__file__).resolve().parent.parent


def _base_python() -> str:
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return getattr(sys, "_base_executable", sys.executable)


def _under(root: Path | None, path: str | Path) -> Path:
    """``path`` as seen from the installer: below ``root`` when one is given."""
    path = Path(path)
    if root is None:
        return path
    return root / path.relative_to(path.anchor)


def _require_root(root: Path | None, what: str) -> None:
    if root is None and os.geteuid() != 0:
        raise ServiceError(f"{what} must run as root (it creates a system user and writes to /opt, /etc "
                           f"and /etc/systemd/system): sudo .venv/bin/pico-gateway {what}")


def render_unit(template: str, prefix: str, etc: str, groups: Sequence[str]) -> str:
    """The unit file for these paths, with only the supplementary groups that exist
    (systemd refuses to start a service naming a group that does not)."""
    text = template.replace(DEFAULT_PREFIX + "/", prefix.rstrip("/") + "/")
    text = text.replace(DEFAULT_ETC + "/", etc.rstrip("/") + "/")
    line = (f"SupplementaryGroups={' '.join(groups)}" if groups
            else "# SupplementaryGroups=: none of dialout, i2c, plugdev exists here")
    return re.sub(r"(?m)^SupplementaryGroups=.*$", line, text)


def install_service(
    source_dir: str | Path | None = None,
    prefix: str = DEFAULT_PREFIX,
    etc: str = DEFAULT_ETC,
    unit_dir: str = DEFAULT_UNIT_DIR,
    run: Run = subprocess.run,
    *,
    root: str | Path | None = None,
    python: str | None = None,
    group_exists: Callable[[str], bool] = _group_exists,
    user_exists: Callable[[str], bool] = _user_exists,
    out: Out = print,
) -> int:
    """Install and start the service; returns 0. Raises ServiceError (not root, no source)."""
    root_path = Path(root) if root is not None else None
    _require_root(root_path, "install-service")
    source = Path(source_dir) if source_dir is not None else default_source_dir()
    template_path = source / "systemd" / SERVICE
    example_config = source / "config" / "gateway.toml"
    if not (source / "pyproject.toml").is_file() or not template_path.is_file() or not example_config.is_file():
        raise ServiceError(f"{source} is not a pico-gateway source tree (pyproject.toml, systemd/{SERVICE} "
                           "and config/gateway.toml are needed): run install-service from a clone")

    groups = [g for g in DEVICE_GROUPS if group_exists(g)]
    missing = [g for g in DEVICE_GROUPS if g not in groups]

    # 1. the system user
    if user_exists(USER):
        if groups:
            run(["usermod", "--append", "--groups", ",".join(groups), USER], check=True)
        out(f"user {USER} exists; device groups: {', '.join(groups) or 'none'}")
    else:
        cmd = ["useradd", "--system", "--no-create-home", "--home-dir", STATE_DIR,
               "--shell", "/usr/sbin/nologin", "--user-group"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        run(cmd + [USER], check=True)
        out(f"created system user {USER} (groups: {', '.join(groups) or 'none'})")
    if missing:
        out(f"note: group(s) {', '.join(missing)} do not exist here and are left out of the unit")

    # 2. the virtualenv with the package (not editable: the clone may go away)
    venv = Path(prefix) / "venv"
    _under(root_path, prefix).mkdir(parents=True, exist_ok=True)
    if not (_under(root_path, venv) / "bin" / "python").exists():
        run([python or _base_python(), "-m", "venv", str(venv)], check=True)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade", str(source)], check=True)
    docs = source / "docs" / "systemd.md"
    if docs.is_file():
        (_under(root_path, prefix) / "docs").mkdir(exist_ok=True)
        shutil.copyfile(docs, _under(root_path, prefix) / "docs" / "systemd.md")
    out(f"installed pico-gateway from {source} into {venv}")

    # 3. the config (never overwritten) and the credential file
    etc_dir = _under(root_path, etc)
    etc_dir.mkdir(parents=True, exist_ok=True)
    config = Path(etc) / "gateway.toml"
    if _under(root_path, config).exists():
        out(f"kept the existing {config}")
    else:
        shutil.copyfile(example_config, _under(root_path, config))
        os.chmod(_under(root_path, config), 0o640)
        run(["chown", f"root:{USER}", str(config)], check=True)
        out(f"wrote {config} from the example: edit it, then: sudo systemctl restart pico-gateway")
    password = Path(etc) / "mqtt-password"
    if not _under(root_path, password).exists():
        fd = os.open(_under(root_path, password), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        out(f"created an empty {password} (root only); put the broker password there if it needs one")

    # 4. the unit
    unit = Path(unit_dir) / SERVICE
    _under(root_path, unit_dir).mkdir(parents=True, exist_ok=True)
    _under(root_path, unit).write_text(render_unit(template_path.read_text(), prefix, etc, groups))
    os.chmod(_under(root_path, unit), 0o644)
    run(["systemctl", "daemon-reload"], check=True)
    run(["systemctl", "enable", SERVICE], check=True)
    # restart, not "enable --now": after an upgrade the running gateway must pick up the new code.
    run(["systemctl", "restart", SERVICE], check=True)
    out(f"wrote {unit}; {SERVICE} is enabled and started. Logs: journalctl -u pico-gateway -f")
    return 0


def uninstall_service(
    prefix: str = DEFAULT_PREFIX,
    etc: str = DEFAULT_ETC,
    unit_dir: str = DEFAULT_UNIT_DIR,
    run: Run = subprocess.run,
    *,
    root: str | Path | None = None,
    out: Out = print,
) -> int:
    """Stop, disable and remove the service and its venv; keep config, data and user."""
    root_path = Path(root) if root is not None else None
    _require_root(root_path, "uninstall-service")
    run(["systemctl", "disable", "--now", SERVICE], check=False)
    unit = Path(unit_dir) / SERVICE
    if _under(root_path, unit).exists():
        _under(root_path, unit).unlink()
        out(f"removed {unit}")
    run(["systemctl", "daemon-reload"], check=False)
    run(["systemctl", "reset-failed", SERVICE], check=False)
    venv = Path(prefix) / "venv"
    if _under(root_path, venv).exists():
        shutil.rmtree(_under(root_path, venv))
        out(f"removed {venv}")
    shutil.rmtree(_under(root_path, prefix) / "docs", ignore_errors=True)
    try:
        _under(root_path, prefix).rmdir()  # only when empty
    except OSError:
        pass
    out(f"kept {etc} (config and mqtt-password), the readings in {STATE_DIR} and the user {USER}; "
        f"remove them by hand if you want them gone: sudo rm -r {etc} {STATE_DIR}; sudo userdel {USER}")
    return 0


# -- command line (wired into gateway.cli) ------------------------------------

def add_subcommands(sub: Any) -> None:
    """Add ``install-service`` and ``uninstall-service`` to the CLI's subparsers."""
    p = sub.add_parser("install-service", help="install and start the gateway as a systemd service (root)")
    p.add_argument("--source", default=None, help="the source tree to install (default: this one)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the venv goes (default: %(default)s)")
    p.add_argument("--etc", default=DEFAULT_ETC, help="the config directory (default: %(default)s)")
    p.set_defaults(func=cmd_install_service)
    p = sub.add_parser("uninstall-service", help="stop and remove the service; keeps config and data (root)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.add_argument("--etc", default=DEFAULT_ETC)
    p.set_defaults(func=cmd_uninstall_service)


def _report(exc: Exception) -> int:
    print(f"pico-gateway: {exc}", file=sys.stderr)
    return 1


def cmd_install_service(args: Any) -> int:
    try:
        return install_service(args.source, prefix=args.prefix, etc=args.etc)
    except ServiceError as exc:
        return _report(exc)
    except subprocess.CalledProcessError as exc:
        return _report(ServiceError(f"'{' '.join(map(str, exc.cmd))}' failed with exit status {exc.returncode}"))


def cmd_uninstall_service(args: Any) -> int:
    try:
        return uninstall_service(prefix=args.prefix, etc=args.etc)
    except ServiceError as exc:
        return _report(exc)
