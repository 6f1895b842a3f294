"""Run the fuzz targets for a time budget: ``python -m fuzz.run --seconds N [target ...]``.

Mutation mode (default): random edits of real seeds (fuzz.targets), each input
derived from (target, seed, iteration), so any finding is replayable from the
line it prints.  ``--atheris``: coverage-guided fuzzing with atheris (if
installed), one child process per target, libFuzzer's -max_total_time.
Inputs that break a contract are written to ``fuzz/findings/`` and the
summary table (inputs, seconds, findings) is printed as Markdown for
docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pickle
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import targets

FINDINGS = Path(__file__).resolve().parent / "findings"


def fuzz_one(name: str, seconds: float, seed: int) -> dict:
    fn, seeds_of, case = targets.TARGETS[name]
    seeds = seeds_of()
    for s in seeds:   # the seeds themselves must pass
        fn(*((s[:-targets.DIGEST],) if name == "executable" else s if name == "stream" else (s,)))
    rng = random.Random(f"{name}:{seed}")
    started, n, findings, notes = time.monotonic(), 0, collections.Counter(), collections.Counter()
    while time.monotonic() - started < seconds:
        args = case(rng, seeds)
        n += 1
        try:
            result = fn(*args)
            if isinstance(result, dict) and result.get("unexpected"):
                notes[result["unexpected"][:120]] += 1
        except (Exception, targets.Hang) as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(tb.filename).name}:{tb.lineno}"
            key = f"{type(exc).__name__} at {where}: {str(exc)[:160]}"
            dedup = f"{type(exc).__name__} at {where}"
            if not any(k.startswith(dedup) for k in findings):
                FINDINGS.mkdir(exist_ok=True)
                digest = hashlib.sha256(pickle.dumps(args)).hexdigest()[:12]
                path = FINDINGS / f"{name}-{digest}.pickle"
                path.write_bytes(pickle.dumps(args))
                print(f"[{name}] FINDING {key}\n  input saved to {path}\n"
                      + "".join(traceback.format_exception(exc)[-3:]), file=sys.stderr, flush=True)
                findings[key] += 1
            else:
                findings[next(k for k in findings if k.startswith(dedup))] += 1
    return {"target": name, "inputs": n, "seconds": round(time.monotonic() - started, 1),
            "findings": dict(findings), "notes": dict(notes)}


def run_atheris(name: str, seconds: int) -> dict:
    corpus = Path(os.environ.get("FUZZ_CORPUS", "/tmp/npud-fuzz-corpus")) / name
    corpus.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fuzz.atheris_main", name, str(corpus),
                           f"-max_total_time={seconds}", "-rss_limit_mb=4096", "-timeout=20",
                           f"-artifact_prefix={FINDINGS}/{name}-"],
                          capture_output=True, text=True)
    FINDINGS.mkdir(exist_ok=True)
    tail = proc.stderr.strip().splitlines()[-12:]
    runs = next((l.split("#", 1)[1].split()[0] for l in reversed(proc.stderr.splitlines())
                 if l.startswith("#") and ("DONE" in l or "pulse" in l or "NEW" in l or "REDUCE" in l)), "?")
    return {"target": f"{name} (atheris)", "inputs": runs, "seconds": round(time.monotonic() - started, 1),
            "findings": {} if proc.returncode == 0 else {"\n".join(tail): 1}, "notes": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=list(targets.TARGETS))
    p.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)),
                   help="budget per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atheris", action="store_true", help="also run coverage-guided fuzzing")
    args = p.parse_args(argv)
    rows = [fuzz_one(n, args.seconds, args.seed) for n in args.names]
    if args.atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install '.[fuzz]'): skipping coverage-guided runs")
        else:
            rows += [run_atheris(n, int(args.seconds)) for n in args.names]
    print("\n| target | inputs | seconds | findings |\n| --- | --- | --- | --- |")
    for r in rows:
        f = "; ".join(f"{k.splitlines()[0]} (x{v})" for k, v in r["findings"].items()) or "none"
        print(f"| {r['target']} | {r['inputs']} | {r['seconds']} | {f} |")
        for k, v in r["notes"].items():
            print(f"|   note | {v} inputs | | {k} |")
    return 1 if any(r["findings"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
