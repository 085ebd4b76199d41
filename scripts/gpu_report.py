"""Helpers of scripts/gpu_check.sh (standard library only, apart from torch for ``device``).

    python3 scripts/gpu_report.py device
        one line "NAME<TAB>SLUG<TAB>DETAILS" for CUDA device 0; exit status 3 and one line on stderr
        when torch sees no CUDA GPU
    python3 scripts/gpu_report.py plan-wheels .whl
        the wheels in .whl that this interpreter needs, one path per line: a package that cannot be
        imported, is older than its wheel, or does not satisfy an exact/minimum pin of another wheel
        that is installed (pydantic pins pydantic-core exactly); the reasons go to stderr
    python3 scripts/gpu_report.py write --steps STEPS.tsv --out FILE.md [--device NAME] ...
        the Markdown report: a header (date, commit, device, versions), a table of the steps, then
        per step its command, status, seconds, key lines and the tail of its log
    python3 scripts/gpu_report.py table --steps STEPS.tsv
        the steps as a plain-text table (for the end of the console output)

STEPS.tsv has one line per step, tab-separated: name, status (PASS, FAIL, TIMEOUT, SKIP), seconds,
time limit in seconds, exit status, log file, command (as a shell would read it), note.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as metadata
import importlib.util
import os
import platform
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TAIL_LINES = 60
KEY_LINES = 40
PASSED = "PASS"

# Lines worth repeating above the tail: the train summary (tokens/s, MFU, losses), pytest's
# counts and its -ra short summary, errors.
KEY_PATTERNS = [re.compile(p) for p in (
    r"^MFU",
    r"tokens/s",
    r"^(done:|paused after|val loss:)",
    r"\b\d+ (passed|failed|errors?)\b",
    r"^(FAILED|ERROR) ",
    r"^(Traceback|[A-Za-z_.]*(Error|Exception):)",
    r"^moe [a-z]+: error:",
)]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ----------------------------------------------------------------------------- steps and logs


@dataclass
class Step:
    name: str
    status: str
    seconds: float
    limit: str
    rc: str
    log: str
    command: str
    note: str = ""


def read_steps(path: str) -> list[Step]:
    steps = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        fields += [""] * (8 - len(fields))
        name, status, seconds, limit, rc, log, command, note = fields[:8]
        try:
            secs = float(seconds)
        except ValueError:
            secs = 0.0
        steps.append(Step(name, status, secs, limit, rc, log, command, note))
    return steps


def clean_lines(text: str) -> list[str]:
    """The lines as a terminal would show them: colour codes dropped, and of a line that tqdm
    redrew with carriage returns only its last state."""
    lines = []
    for raw in _ANSI.sub("", text).split("\n"):
        parts = [p for p in raw.split("\r") if p.strip()]
        lines.append(parts[-1].rstrip() if parts else raw.rstrip("\r").rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return lines


def read_log(path: str) -> list[str]:
    try:
        return clean_lines(Path(path).read_bytes().decode("utf-8", errors="replace"))
    except OSError:
        return []


def key_lines(lines: list[str]) -> list[str]:
    seen, keys = set(), []
    for line in lines:
        stripped = line.strip()
        if stripped and stripped not in seen and any(p.search(stripped) for p in KEY_PATTERNS):
            seen.add(stripped)
            keys.append(line)
    return keys[-KEY_LINES:]


def fenced(text: str, lang: str = "text") -> str:
    """A code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


# ----------------------------------------------------------------------------- report


def versions() -> dict:
    found = {"python": platform.python_version()}
    for dist in ("torch", "triton", "deepspeed"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def summary(steps: list[Step]) -> str:
    passed = sum(s.status == PASSED for s in steps)
    total = sum(s.seconds for s in steps)
    return f"{passed} of {len(steps)} steps passed in {total:.0f} s"


def render(steps: list[Step], device: str, details: str, commit: str, date: str,
           found: Optional[dict] = None, env: Optional[dict] = None) -> str:
    found = versions() if found is None else found
    env = {} if env is None else env
    out = [f"# GPU check: {device}", ""]
    out += ["| | |", "| --- | --- |",
            f"| date | {date} |",
            f"| commit | {commit} |",
            f"| device | {device}{f' ({details})' if details else ''} |"]
    out += [f"| {name} | {version} |" for name, version in found.items()]
    out += [f"| {name} | `{value}` |" for name, value in env.items()]
    out += [f"| result | {summary(steps)} |", ""]
    out += ["Made by `bash scripts/gpu_check.sh` (the wheels from `scripts/gpu_wheelhouse.sh`); each step ran "
            "with its own time limit, in this order. Logs: gpu-check-logs.tar.gz beside this file.", ""]
    out += ["| step | status | seconds | limit (s) | note |", "| --- | --- | ---: | ---: | --- |"]
    out += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.limit} | {s.note} |" for s in steps]
    for s in steps:
        lines = read_log(s.log)
        out += ["", f"## {s.name}: {s.status}, {s.seconds:.1f} s", ""]
        out += [fenced(s.command, "sh"), ""]
        meta = f"exit status {s.rc}, time limit {s.limit} s"
        out += [meta + (f"; {s.note}" if s.note else "") + ".", ""]
        keys = key_lines(lines)
        if keys:
            out += ["Key lines:", "", fenced("\n".join(keys)), ""]
        if lines:
            shown = lines[-TAIL_LINES:]
            out += [f"Output (last {len(shown)} of {len(lines)} lines):", "", fenced("\n".join(shown))]
        else:
            out += ["(no output)"]
    return "\n".join(out) + "\n"


def table(steps: list[Step]) -> str:
    width = max([len("step")] + [len(s.name) for s in steps])
    rows = [f"{'step':<{width}}  {'status':<7}  {'seconds':>7}  note"]
    for s in steps:
        rows.append(f"{s.name:<{width}}  {s.status:<7}  {s.seconds:>7.1f}  {s.note}".rstrip())
    rows.append(summary(steps))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- device


def slug(name: str) -> str:
    """The file-name form of a device name, as ``moe bench kernels`` makes it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def device_line() -> int:
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - any failure to import is reported the same way
        print(f"gpu_check: cannot import torch with {sys.executable}: {type(err).__name__}: {err}", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}); run this on the GPU machine", file=sys.stderr)
        return 3
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    details = (f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
               f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
               f"{torch.cuda.device_count()} visible")
    print(f"{name}\t{slug(name)}\t{details}")
    return 0


# ----------------------------------------------------------------------------- wheels


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _vtuple(version: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0]))


def _installed(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pins(wheel: Path) -> list[tuple[str, str, str]]:
    """(distribution, operator, version) of the wheel's unconditional ==, >= and > requirements."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(name).decode("utf-8", errors="replace")
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    pins = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:") or ";" in line:
            continue
        spec = line.split(":", 1)[1].strip()
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
        if not match:
            continue
        for part in match.group(2).split(","):
            op = re.match(r"\s*(==|>=|>)\s*([0-9][^\s,]*)", part)
            if op:
                pins.append((_normalize(match.group(1)), op.group(1), op.group(2)))
    return pins


def _satisfies(installed: str, op: str, version: str) -> bool:
    have, want = _vtuple(installed), _vtuple(version)
    return {"==": have == want, ">=": have >= want, ">": have > want}[op]


def plan_wheels(folder: str) -> tuple[list[str], list[str]]:
    """The wheels to install (paths) and why (one line each)."""
    wheels = {}
    for path in sorted(Path(folder).glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2:
            wheels[_normalize(parts[0])] = (path, parts[1])
    needed, reasons = {}, []
    for dist, (path, version) in wheels.items():
        have = _installed(dist)
        if not _importable(dist):
            needed[dist] = True
            reasons.append(f"{dist} {version}: cannot be imported")
        elif have is not None and _vtuple(have) < _vtuple(version):
            needed[dist] = True
            reasons.append(f"{dist} {version}: {have} is older")
    changed = True
    while changed:  # what the wheels to install pin must be met by what they will run with
        changed = False
        for dist in list(needed):
            for other, op, version in _pins(wheels[dist][0]):
                if other in needed or other not in wheels:
                    continue
                have = _installed(other)
                if have is None or not _satisfies(have, op, version):
                    needed[other] = True
                    changed = True
                    reasons.append(f"{other} {wheels[other][1]}: {dist} needs {other}{op}{version}, "
                                   f"{have or 'none'} is installed")
    return [str(wheels[d][0]) for d in wheels if d in needed], reasons


# ----------------------------------------------------------------------------- command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_report.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("device", help="name, slug and details of CUDA device 0 (exit 3 without one)")
    plan = sub.add_parser("plan-wheels", help="the wheels this interpreter needs")
    plan.add_argument("folder")
    write = sub.add_parser("write", help="write the Markdown report")
    write.add_argument("--steps", required=True)
    write.add_argument("--out", required=True)
    write.add_argument("--device", default="unknown device")
    write.add_argument("--details", default="")
    write.add_argument("--commit", default="unknown")
    write.add_argument("--date", default=None, help="default: now, UTC")
    show = sub.add_parser("table", help="print the steps as a table")
    show.add_argument("--steps", required=True)
    args = parser.parse_args(argv)

    if args.command == "device":
        return device_line()
    if args.command == "plan-wheels":
        paths, reasons = plan_wheels(args.folder)
        for reason in reasons:
            print(f"gpu_check: install {reason}", file=sys.stderr)
        for path in paths:
            print(path)
        return 0
    steps = read_steps(args.steps)
    if args.command == "table":
        print(table(steps))
        return 0
    date = args.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {name: os.environ[name] for name in ("TORCH_CUDA_ARCH_LIST", "SLIMMOE_TRITON_AUTOTUNE", "CUDA_VISIBLE_DEVICES")
           if name in os.environ}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(steps, args.device, args.details, args.commit, date, env=env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
