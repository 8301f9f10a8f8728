"""WebAssembly test modules, written as WAT text here and built at test time (no toolchain, no download)."""

from __future__ import annotations

from pathlib import Path

_PRINT = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
"""


def say(*lines: tuple[int, str], code: int = 0) -> str:
    """Write each (fd, text) as a line (fd 1 is stdout, 2 stderr), then exit with *code*."""
    data, calls, at = "", "", 64
    for number, (fd, text) in enumerate(lines):
        line = (text + "\n").encode()
        escaped = "".join(f"\\{b:02x}" for b in line)
        data += f'(data (i32.const {at}) "{escaped}")\n'
        vec = 8 * number
        calls += (f"(i32.store (i32.const {vec}) (i32.const {at})) (i32.store (i32.const {vec + 4}) "
                  f"(i32.const {len(line)})) (drop (call $fd_write (i32.const {fd}) (i32.const {vec}) (i32.const 1) "
                  "(i32.const 60)))\n")
        at += len(line)
    return f"""(module {_PRINT}
  {data}
  (func (export "_start")
    {calls}
    (call $proc_exit (i32.const {code}))))
"""


def hello(text: str = "hello from wasm", code: int = 0) -> str:
    """Print *text* on stdout, then exit with *code*."""
    return say((1, text), code=code)


#: Exits with its argc * 10 + the number of its environment variables.
COUNTS = """(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $args (i32.const 0) (i32.const 4)))
    (drop (call $env (i32.const 8) (i32.const 12)))
    (call $proc_exit (i32.add (i32.mul (i32.load (i32.const 0)) (i32.const 10)) (i32.load (i32.const 8))))))
"""

#: Grows its memory a megabyte at a time until a grow is refused, then traps.
MEMORY_HOG = """(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
"""

#: Spins forever.
CPU_HOG = """(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $spin (br $spin))))
"""

#: Prints "started", then waits (a busy loop checking the clock would burn CPU: it sleeps with poll_oneoff).
SLEEPER = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "started\\0a")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; one clock subscription at 200: userdata 0, tag clock, id monotonic, 1 s timeout, relative
    (i64.store (i32.const 200) (i64.const 0))
    (i32.store8 (i32.const 208) (i32.const 0))
    (i32.store (i32.const 216) (i32.const 1))
    (i64.store (i32.const 224) (i64.const 1000000000))
    (i64.store (i32.const 232) (i64.const 0))
    (i32.store16 (i32.const 240) (i32.const 0))
    (loop $wait
      (drop (call $poll (i32.const 200) (i32.const 300) (i32.const 1) (i32.const 400)))
      (br $wait))))
"""


def write(where: Path, name: str, text: str) -> Path:
    """*text* saved as ``<where>/<name>.wat``; its path."""
    path = where / f"{name}.wat"
    path.write_text(text)
    return path
