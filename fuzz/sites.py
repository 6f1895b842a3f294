"""Where do mutated ONNX models escape the compiler's CompileError contract?

``python -m fuzz.sites --seconds N [--seed S] [--show K]`` runs the ``onnx``
target's mutator (fuzz.targets) against ``compile_model`` directly, so each
exception keeps its traceback, and groups the inputs whose compile raised
anything other than CompileError/MemoryError (what the worker's catch-all
reports as "cannot compile this model") by (exception type, innermost
compiler_worker frame).  The same (target, seed, iteration) derivation as
fuzz.run, so a site is replayable: ``--replay I`` prints iteration I's
traceback.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
import traceback
from pathlib import Path

from npud.compiler_worker.api import compile_model
from npud.compiler_worker.errors import CompileError

from . import targets


def _site(exc: BaseException) -> str:
    """The innermost frame inside compiler_worker (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "compiler_worker" in f.filename] or frames
    f = ours[-1]
    return f"{f.filename.split('npud/compiler_worker/')[-1]}:{f.lineno} {f.name}"


def _wraps_python_error(exc: CompileError) -> bool:
    cause = exc.__context__   # protobuf's DecodeError is the documented "malformed model" path
    return cause is not None and not isinstance(cause, (CompileError, MemoryError)) \
        and type(cause).__name__ != "DecodeError"


def _compile(model: bytes, wrapped: bool = False) -> BaseException | None:
    """The escaping exception of one compile, or None if it compiled or was refused properly
    (with `wrapped`, a CompileError raised while handling a Python exception returns that one)."""
    with targets.time_and_memory_limit(targets.ONNX_TIME_LIMIT, targets.ONNX_MEMORY_LIMIT):
        try:
            compile_model(model, targets.CONFIG)
        except CompileError as exc:
            return exc.__context__ if wrapped and _wraps_python_error(exc) else None
        except (MemoryError, targets.Hang):
            return None
        except Exception as exc:  # noqa: BLE001 -- classifying escapes is the point
            return exc
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=1, help="tracebacks printed per site")
    p.add_argument("--wrapped", action="store_true",
                   help="also count CompileErrors that wrap a Python exception")
    p.add_argument("--corpus", type=Path, help="classify this directory's files, not mutants")
    p.add_argument("--replay", type=int, default=None, help="print iteration I's outcome only")
    args = p.parse_args(argv)
    _fn, seeds_of, case = targets.TARGETS["onnx"]
    seeds = seeds_of()
    rng = random.Random(f"onnx:{args.seed}")
    sites: collections.Counter = collections.Counter()
    shown: dict = collections.defaultdict(list)
    started, n = time.monotonic(), 0
    corpus = iter(sorted(args.corpus.iterdir())) if args.corpus else None
    while corpus is not None or time.monotonic() - started < args.seconds:
        if corpus is not None:
            path = next(corpus, None)
            if path is None:
                break
            model = path.read_bytes()
        else:
            (model,) = case(rng, seeds)
        n += 1
        if args.replay is not None and n != args.replay:
            continue
        exc = _compile(model, args.wrapped)
        if exc is None:
            if args.replay is not None:
                print("no escape")
                return 0
            continue
        key = (type(exc).__name__, _site(exc))
        sites[key] += 1
        if len(shown[key]) < args.show:
            shown[key].append((n, "".join(traceback.format_exception(exc)[-6:]), str(exc)[:200]))
        if args.replay is not None:
            print("".join(traceback.format_exception(exc)))
            return 0
    print(f"{n} inputs in {time.monotonic() - started:.0f} s; {sum(sites.values())} escapes\n")
    for (typ, where), count in sites.most_common():
        print(f"{count:6d}  {typ} at {where}")
        for i, tb, msg in shown[(typ, where)]:
            print(f"        iteration {i}: {msg}\n" + "".join("        " + l + "\n"
                                                              for l in tb.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
