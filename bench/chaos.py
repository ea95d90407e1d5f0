"""Chaos run of the real ``twistd mllp`` process (issue 11): kill -9,
SIGTERM, a full disk (RLIMIT_FSIZE lowered with prlimit, then raised, no
restart) and a flapping upstream, in a loop under load, checking after each
cycle that every AA'd message is stored and delivered in order per sender.

    python bench/chaos.py --cycles 20 [--senders 3] [--phase-acks 20]

Prints one JSON line per cycle and a summary; exits 1 on any broken promise.
The cycle itself is tests/chaos.py (tests/test_chaos.py runs one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests.chaos import PHASE_ACKS, ChaosRun  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--phase-acks", type=int, default=PHASE_ACKS,
                        help="AAs per sender in each load phase between faults")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="mllpd-chaos-")
    run = ChaosRun(workdir, senders=args.senders, phase_acks=args.phase_acks)
    started = time.monotonic()
    try:
        run.start()
        for n in range(1, args.cycles + 1):
            run.cycle()
            r = run.report
            print(json.dumps({"cycle": n, "acked": r.acked, "checked": r.checked,
                              "redelivered": r.redelivered, "refused_while_full": r.refused_while_full,
                              "seconds": round(time.monotonic() - started, 1)}), flush=True)
            if r.problems:
                break
    finally:
        run.report.seconds = time.monotonic() - started
        run.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = dataclasses.asdict(run.report)
    print(json.dumps({"summary": report}, indent=2))
    return 1 if run.report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
