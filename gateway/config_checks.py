"""What ``run`` would fail on that the configuration file alone does not show.

The file validates in :mod:`gateway.config`; these checks look at the machine:
the password and TLS files (``MqttConfig.file_problems``), whether this process may
create and write the database, and the devices' addresses (each link's own
``address_problems``, and two devices on one address)::

    problems, notes = runtime_problems(cfg.mqtt.file_problems(), cfg.store.path,
                                       list(enumerate(cfg.devices)), running=True)

Each problem names its key and says what to write instead; ``check-config`` and
``run`` (through ``config.load_runnable``) refuse a config with any, exit status 2.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.links.base import DeviceConfig


SQLITE_HEADER = b"SQLite format 3\x00"


def current_user() -> str:
    """Who this process is, for messages about what it may write."""
    try:
        return f"user '{pwd.getpwuid(os.geteuid()).pw_name}'"
    except KeyError:
        return f"uid {os.geteuid()}"


def store_path_problem(path: Path, key: str = "store.path") -> str | None:
    """Why the gateway, as the user this process runs as, could not open ``path`` as its
    database: a directory, not a file, not SQLite, or a folder it may not create or
    write in (SQLite writes its -wal and -shm files beside the database). None when it can.

    ``os.access`` answers for the real user, and says no on a read-only file system,
    as the service's ``ProtectSystem=strict`` makes every folder but its own."""
    path = Path(os.path.abspath(path))
    if os.path.isdir(path):
        return (f"{key}: {path} is a directory: name the database file in it, "
                f'e.g. path = "{path / "readings.db"}"')
    if os.path.lexists(path):
        if not os.path.isfile(path):
            return f"{key}: {path} is not a regular file: name a file for the database, e.g. readings.db"
        if not os.access(path, os.R_OK | os.W_OK):
            return (f"{key}: {current_user()} may not read and write {path}: change its owner or mode, "
                    "or choose another path")
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            return f"{key}: cannot read {path}: {exc.strerror or exc}"
        if head and head != SQLITE_HEADER:
            return f"{key}: {path} is not an SQLite database: choose another path (the gateway never overwrites it)"
        folder = path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            return (f"{key}: {current_user()} may not create files in {folder} (SQLite keeps its journal beside "
                    f"the database): make the folder writable for it, or choose another path")
        return None
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent  # the gateway creates the missing folders: can it, in the nearest existing one?
    if not os.path.isdir(folder):
        return f"{key}: cannot create {path}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"{key}: {current_user()} may not create {path}: it cannot write in {folder}; create the folder "
                "for it (owned by the gateway's user), or choose another path")
    return None


def _device_label(index: int, device: DeviceConfig) -> str:
    return f"devices[{index}] (id '{device.id}')"


def device_problems(devices: list[tuple[int, DeviceConfig]]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the devices' addresses, each device's own (its link's
    ``DeviceConfig.address_problems``: a port that is not a device path, a tcp host that is
    not one, ...), and two devices on one address. ``devices``: (index in the file, device)."""
    problems: list[str] = []
    notes: list[str] = []
    claimed: dict[tuple[str, ...], str] = {}  # the address one device uses -> that device
    for index, device in devices:
        label = _device_label(index, device)
        own, said, address = device.address_problems(label)
        problems += own
        notes += said
        if address is None:
            continue
        if address in claimed:
            problems.append(f"{label}: the same {address[0]} as {claimed[address]}: one Pico cannot be two devices")
        else:
            claimed[address] = label
    return problems, notes


def runtime_problems(mqtt_files: tuple[list[str], list[str]] | None, store_path: Path | None,
                     devices: list[tuple[int, DeviceConfig]], running: bool) -> tuple[list[str], list[str]]:
    """(problems, notes): everything beyond the file's validation that ``run`` would fail
    on, each naming its key: the password and TLS files, the database's path, the devices'
    addresses (of the sections given: None for one that did not validate;
    ``mqtt_files``: ``MqttConfig.file_problems()``).
    ``running``: for ``run`` itself, where a systemd credential outside the service is
    a problem too, not a note."""
    problems: list[str] = []
    notes: list[str] = []
    if mqtt_files is not None:
        problems, notes = mqtt_files
        if running and notes:
            problems, notes = problems + notes, []
    store_problem = store_path_problem(store_path) if store_path is not None else None
    if store_problem:
        problems.append(store_problem)
    device_issues, device_notes = device_problems(devices)
    return problems + device_issues, notes + device_notes
