"""Run the benchmark suite and append dated results to BENCHMARKS.md.

    python -m benchmarks                    # every benchmarks/bench_*.py
    python -m benchmarks scan runtime       # just these (bench_scan.py, bench_runtime.py)
    python -m benchmarks --no-record ...    # print only

Each module's run() measures its own comparison side by side (e.g. chunked vs reference scan) and
returns a JSON-able dict; this runner records the machine, the command and the date with it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "BENCHMARKS.md"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    described = f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"
    torch = sys.modules.get("torch")  # imported by the benchmark that ran, if it used torch
    if torch is not None and torch.cuda.is_available():
        described += f"; GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return described


def _markdown(name: str, result: dict, seconds: float, command: str) -> str:
    lines = [f"### {name} — {datetime.date.today().isoformat()}", "",
             f"- machine: {machine()}", f"- command: `{command}`", f"- wall time: {seconds:.0f} s", ""]
    rows = result.get("rows")
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    rest = {k: v for k, v in result.items() if k != "rows"}
    if rest:
        lines += ["```json", json.dumps(rest, indent=2, default=str), "```", ""]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = set(names) - set(available())
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; available: {available()}")
    failed = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("EVIM3_BENCH_")]
        command = " ".join([*settings, f"python -m benchmarks {name}"])
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = module.run()
        except Exception as e:  # noqa: BLE001 -- report and continue with the others
            print(f"   FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        text = _markdown(name, result, time.perf_counter() - t0, command)
        print(text)
        if not args.no_record:
            with open(RESULTS_FILE, "a") as f:
                f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
