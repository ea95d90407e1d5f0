"""The long profile of the protocol fuzzer (tests/test_fuzz.py).

Runs hypothesis's stateful machine over the MLLP protocol in rounds of
--examples random programs (each up to --steps steps) until --minutes have
passed or a program breaks an invariant; prints the rounds, programs and
steps run, and the failing program (shrunk) if one did.

    python bench/fuzz.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from tests.test_fuzz import ProtocolMachine, fuzz_settings  # noqa: E402


class _Counted(ProtocolMachine):
    steps = 0
    programs = 0

    def __init__(self) -> None:
        super().__init__()
        _Counted.programs += 1

    def check_invariants(self, *args: object, **kwargs: object) -> None:
        _Counted.steps += 1
        super().check_invariants(*args, **kwargs)  # type: ignore[arg-type]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    rounds = 0
    failure = None
    while time.monotonic() < deadline:
        try:
            run_state_machine_as_test(_Counted, settings=fuzz_settings(args.examples, args.steps))
        except Exception:  # noqa: BLE001 - reported below
            failure = traceback.format_exc()
            break
        rounds += 1
    result = {
        "minutes": round((time.monotonic() - started) / 60, 2),
        "rounds": rounds,
        "programs": _Counted.programs,
        "steps": _Counted.steps,
        "failed": failure is not None,
    }
    print(json.dumps(result))
    if failure:
        print(failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
