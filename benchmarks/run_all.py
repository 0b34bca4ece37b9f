"""`make bench`: run every benchmark script in this folder, one after the other, and say which failed.

Each script prints its own figures and the machine; ratios are measured within one script's run,
so they hold on a noisy machine.

    python benchmarks/run_all.py [--only tracking,scaling] [--quick] [--json-dir DIR] [EXTRA ...]

``--quick`` goes to the scripts that have a quick mode (the others run their defaults);
``--json-dir DIR`` gives each script that writes JSON ``--json DIR/<script>.json``; any other
argument is passed to every script unchanged. A table of exit codes and run times ends the run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Hours at full scale: run only when named in --only, or with --quick (its smoke mode).
_LONG = {"bench_fullscale.py"}


def _accepts(script: Path, flag: str) -> bool:
    return f'"{flag}"' in script.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated names, e.g. tracking,scaling (bench_<name>.py)")
    parser.add_argument("--quick", action="store_true", help="smoke runs, for the scripts that have a quick mode")
    parser.add_argument("--json-dir", type=Path, default=None, help="write each script's JSON here")
    args, extra = parser.parse_known_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {name.strip().removeprefix("bench_").removesuffix(".py") for name in args.only.split(",")}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            parser.error(f"--only {args.only!r}: no bench_{{{','.join(sorted(unknown))}}}.py in {HERE}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    elif not args.quick:
        skipped = [s.name for s in scripts if s.name in _LONG]
        scripts = [s for s in scripts if s.name not in _LONG]
        if skipped:
            print(f"skipping {', '.join(skipped)} (hours at full scale; run it with --only or --quick)")
    failed, times = [], []
    for script in scripts:
        command = [sys.executable, str(script)]
        if args.quick and _accepts(script, "--quick"):
            command.append("--quick")
        if args.json_dir is not None and _accepts(script, "--json"):
            command += ["--json", str(args.json_dir.resolve() / f"{script.stem}.json")]
        print(f"\n=== {script.name} ===", flush=True)
        started = time.perf_counter()
        code = subprocess.call([*command, *extra], cwd=HERE.parent)
        elapsed = time.perf_counter() - started
        times.append((script.name, code, elapsed))
        print(f"=== {script.name}: exit {code}, {elapsed:.0f} s ===", flush=True)
        if code != 0:
            failed.append(script.name)
    print("\n| script | exit | seconds |\n|---|---:|---:|")
    for name, code, elapsed in times:
        print(f"| {name} | {code} | {elapsed:.0f} |")
    print(f"| total | | {sum(t[2] for t in times):.0f} |")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
