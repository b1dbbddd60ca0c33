"""The virtual Pico's filesystem: a host directory that is the board's ``/``.

Each virtual Pico has its own directory (``--fs DIR``, default
``<state-dir>/fs``).  The Pico process's working directory is that directory,
so relative paths (``open("main.py", "w")``, what ``pico-gateway flash``
sends) land in it, and the board's code sees absolute paths as on the
board: ``open("/main.py")``, ``os.stat("/lib")``, ``os.listdir("/")``,
``os.ilistdir()``, ``os.mkdir``, ``os.remove``, ``os.rename``, ``os.rmdir``,
``os.chdir``/``os.getcwd`` and ``os.statvfs`` map ``/x`` to ``<fs>/x`` (and
``..`` never leaves the root).  Only code that runs *on the board* is mapped:
the REPL's input (mpremote's fs commands) and modules loaded from the fs;
the simulator itself and the standard library keep host paths.

``populate()`` gives a fresh Pico its files once, at power-on (never on a
reset, so whatever was written to the fs survives resets as on a board):
``--firmware DIR`` copies DIR's top-level ``*.py``; ``--firmware FILE.py``
copies that file as ``main.py``; ``--config-py`` is copied as ``config.py``
when a firmware is given.  A stock Pico (no ``--firmware``) starts with an
empty fs.
"""

import builtins
import errno
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

root: str | None = None      # absolute host path of the board's "/"
_roots: tuple[str, ...] = ()  # root and its realpath, for telling board code apart
_orig: dict[str, Callable[..., Any]] = {}


def populate(fs, firmware_dir=None, firmware_main=None, config_py=None):
    os.makedirs(fs, exist_ok=True)
    if firmware_main is None:
        return
    if os.path.basename(firmware_main) == "main.py" and os.path.dirname(firmware_main) == firmware_dir:
        for name in sorted(os.listdir(firmware_dir)):
            src = os.path.join(firmware_dir, name)
            if name.endswith(".py") and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(fs, name))
    else:
        shutil.copyfile(firmware_main, os.path.join(fs, "main.py"))
    if config_py:
        shutil.copyfile(config_py, os.path.join(fs, "config.py"))


def host_path(path):
    """Host path of a board path (absolute or relative to the board's cwd)."""
    if isinstance(path, bytes):
        return os.fsencode(host_path(os.fsdecode(path)))
    cwd = board_cwd()
    board = os.path.normpath(os.path.join(cwd, path)) if path else cwd
    board = "/" + board.lstrip("/")
    return root if board == "/" else root + board


def board_cwd():
    cwd = _orig["getcwd"]()
    for r in _roots:
        if cwd == r:
            return "/"
        if cwd.startswith(r + "/"):
            return cwd[len(r):]
    return "/"


def _on_board(depth=2):
    """True when the caller of the wrapped function is code running on the board."""
    try:
        f = sys._getframe(depth)  # noqa: SLF001 -- CPython's documented frame API; inspect.stack() is far slower per os call
    except ValueError:
        return False
    name = f.f_code.co_filename
    if name == "<stdin>":
        return True
    for r in _roots:
        if name.startswith(r + "/"):
            return True
    return False


def _board_error(e):
    code = e.errno or errno.EIO
    return OSError(code, errno.errorcode.get(code, "EIO"))


def _wrap_path_fn(name, nargs=1):
    orig = _orig[name] = getattr(os, name)

    def wrapper(*args, **kw):
        if not _on_board():
            return orig(*args, **kw)
        mapped = [host_path(a) if isinstance(a, (str, bytes)) else a for a in args[:nargs]]
        try:
            return orig(*mapped, *args[nargs:], **kw)
        except OSError as e:
            raise _board_error(e) from None

    wrapper.__name__ = name
    setattr(os, name, wrapper)


def install(fs):
    """Make ``fs`` the board's root: chdir there and map the board's paths."""
    global root, _roots
    root = os.path.abspath(fs)
    _roots = tuple({root, os.path.realpath(root)})
    os.chdir(root)
    if _orig:
        return
    for name in ("stat", "listdir", "mkdir", "rmdir", "remove", "unlink", "chdir", "statvfs"):
        _wrap_path_fn(name)
    _wrap_path_fn("rename", 2)
    _orig["getcwd"] = os.getcwd
    _orig["open"] = builtins.open

    def getcwd():
        return board_cwd() if _on_board() else _orig["getcwd"]()

    def open(file, *args, **kw):
        if not _on_board() or not isinstance(file, (str, bytes)):
            return _orig["open"](file, *args, **kw)
        try:
            return _orig["open"](host_path(file), *args, **kw)
        except OSError as e:
            raise _board_error(e) from None

    def ilistdir(path=""):
        """MicroPython's os.ilistdir: (name, type, inode, size) per entry."""
        host = host_path(path) if _on_board() else (path or ".")
        try:
            entries = list(os.scandir(host))
        except OSError as e:
            raise _board_error(e) from None
        for ent in entries:
            st = ent.stat(follow_symlinks=True)
            yield (ent.name, 0x4000 if ent.is_dir() else 0x8000, 0, 0 if ent.is_dir() else st.st_size)

    os.getcwd = getcwd
    os.ilistdir = ilistdir  # type: ignore[attr-defined]  # MicroPython's os has ilistdir, CPython's does not
    builtins.open = open
