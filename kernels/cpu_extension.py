"""Build and load the C++ CPU expert MLP (``kernels/csrc/expert_mlp_cpu.cpp``) on first use.

It is compiled by :func:`torch.utils.cpp_extension.load` (ninja and the C++ compiler the machine
has) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``), once
per machine and vector ISA; later processes import the cached build (a changed source is rebuilt).
The vector width follows what torch itself uses on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the portable default). It runs its
threads on the OpenMP runtime torch has loaded, so they are torch's intra-op threads.

Where it cannot be built (no compiler, no ninja, an unsupported platform) :func:`load` warns once
and returns None, and the CPU path runs the Python implementation of the same algorithm
(:class:`kernels.expert_mlp._BlockedExpertMLP`). ``SLIMMOE_CPU_EXTENSION=0`` skips the extension.
"""

from __future__ import annotations

import os
import threading
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


def enabled() -> bool:
    """False when ``SLIMMOE_CPU_EXTENSION=0`` asks for the Python implementation."""
    return os.environ.get("SLIMMOE_CPU_EXTENSION", "1") != "0"


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch, or a CPU it does not classify
        return "DEFAULT"


def _build():
    from torch.utils import cpp_extension

    capability = _capability()
    flags, vec = _FLAGS.get(capability, ([], None))
    defines = [f"-DCPU_CAPABILITY={vec}", f"-DCPU_CAPABILITY_{vec}"] if vec else []
    return cpp_extension.load(
        name=f"slimmoe_expert_mlp_cpu_{capability.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", *flags, *defines],
        extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch has already loaded
        verbose=False,
    )


def load():
    """The compiled module (``forward``, ``backward``), or None where it cannot be built or is disabled."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
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
