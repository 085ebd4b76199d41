"""Build and load the C++ CPU expert MLP (``kernels/csrc/expert_mlp_cpu.cpp``) on first use.

It is compiled by :func:`torch.utils.cpp_extension.load` (ninja and the C++ compiler the machine
has) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``), once
per machine and vector ISA; later processes import the cached build (a changed source is rebuilt).
The vector width follows what torch itself uses on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the portable default). It runs its
threads on the OpenMP runtime torch has loaded, so they are torch's intra-op threads.

The first build takes tens of seconds: when loading has not finished within a second, one line on
stderr says the kernel is being compiled, and another how long it took (local rank 0 only; the other
ranks wait for the same build).

A build interrupted by a kill leaves torch's build lock (the file ``lock`` in the build folder)
behind, and every later load would wait for it forever (``torch.utils.file_baton.FileBaton.wait``).
So each load here first takes an advisory lock of its own (``flock`` on ``slimmoe.flock`` in the
same folder, which the system releases when its holder dies): holding it, no other load of this
extension is running, so a ``lock`` file found then is stale and is removed, with a line on stderr.

Where it cannot be built (no compiler, no ninja, an unsupported platform) :func:`load` warns once
and returns None, and the CPU path runs the Python implementation of the same algorithm
(:class:`kernels.expert_mlp._BlockedExpertMLP`). ``SLIMMOE_CPU_EXTENSION=0`` skips the extension.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "expert_mlp_cpu.cpp"
_FLAGS = {  # torch's CPU capability -> (compiler flags, the at::vec implementation to select)
    "AVX512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"], "AVX512"),
    "AVX2": (["-mavx2", "-mfma"], "AVX2"),
}
_lock = threading.Lock()
_state: dict = {}
ANNOUNCE_AFTER_S = 1.0
"""A load that takes longer than this is a build, and is announced."""


def enabled() -> bool:
    """False when ``SLIMMOE_CPU_EXTENSION=0`` asks for the Python implementation."""
    return os.environ.get("SLIMMOE_CPU_EXTENSION", "1") != "0"


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch, or a CPU it does not classify
        return "DEFAULT"


def extension_name() -> str:
    return f"slimmoe_expert_mlp_cpu_{_capability().lower()}"


def build_directory():
    """The folder torch builds the extension in (created if missing), or None where this torch does not
    say (then torch picks it, and stale-lock recovery is off)."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_build_directory", None)
    if get is None:
        return None
    try:
        return get(extension_name(), False)
    except Exception:  # noqa: BLE001 - an unexpected signature: let torch decide
        return None


@contextlib.contextmanager
def _exclusive(folder):
    """Hold ``flock`` on ``folder/slimmoe.flock`` (a no-op without a folder or without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        fcntl = None
    if folder is None or fcntl is None:
        yield
        return
    fd = os.open(os.path.join(folder, "slimmoe.flock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process loads or builds it
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale_baton(folder) -> bool:
    """Remove torch's build lock in ``folder`` (call it only under :func:`_exclusive`): True if there was one."""
    if folder is None:
        return False
    baton = os.path.join(folder, "lock")
    try:
        os.remove(baton)
    except FileNotFoundError:
        return False
    print(f"kernels: removed {baton}, a build lock left by an interrupted build of the C++ CPU expert kernel",
          file=sys.stderr, flush=True)
    return True


def _build():
    from torch.utils import cpp_extension

    capability = _capability()
    flags, vec = _FLAGS.get(capability, ([], None))
    defines = [f"-DCPU_CAPABILITY={vec}", f"-DCPU_CAPABILITY_{vec}"] if vec else []
    folder = build_directory()
    with _exclusive(folder):
        remove_stale_baton(folder)
        return cpp_extension.load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *flags, *defines],
            extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch has already loaded
            build_directory=folder,
            verbose=False,
        )


def _announced_build():
    """:func:`_build`, with a line on stderr when it is slow enough to be compiling, and its time."""
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    finished = threading.Event()
    announced = []
    start = time.perf_counter()

    def announce() -> None:
        if not finished.wait(ANNOUNCE_AFTER_S) and not quiet:
            announced.append(True)
            print("kernels: compiling the C++ CPU expert kernel (once per machine; later runs load it from torch's "
                  "extension cache)...", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=announce, daemon=True)
    watcher.start()
    try:
        return _build()
    finally:
        finished.set()
        watcher.join()
        if announced:
            print(f"kernels: the C++ CPU expert kernel was ready after {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)


def load():
    """The compiled module (``forward``, ``backward``), or None where it cannot be built or is disabled."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _announced_build()
            except Exception as err:  # noqa: BLE001 - any build failure means: use the Python path
                _state["module"] = None
                _state["error"] = f"{type(err).__name__}: {err}".strip().splitlines()[0]
                warnings.warn(
                    "kernels: the C++ CPU expert MLP could not be built, so the slower Python implementation "
                    f"runs instead ({_state['error']}). Set SLIMMOE_CPU_EXTENSION=0 to skip the build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _state["module"]


def build_error() -> str | None:
    """Why the last :func:`load` returned None after trying to build (None if it did not fail)."""
    return _state.get("error")
