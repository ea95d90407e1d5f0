"""Worst-case time of rules per frame size: how long one message can hold
the reactor in RuleSet.model + check + route.

For each frame size it builds the messages that cost the model the most
(many OBX segments read by an ``obx_list`` rule; one field of many
components read as a composite; a huge repeated field; a huge PID name)
and times model + check + route with rules over every model key, taking
the best of --repeat runs (to keep other processes out of the figure).

    python bench/rules_worst.py [--sizes 65536,262144,1048576,2097152] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllpd.hl7 import Message, parse_message  # noqa: E402
from mllpd.rules import (  # noqa: E402
    MAX_MODEL_COMPONENTS,
    MAX_MODEL_SEGMENTS,
    ModelLimitError,
    Rule,
    RuleSet,
)

RULES = [
    Rule("obx-plausible", 'obx_list.all(o, o.identifier != "8867-4" || o.value != "999")'),
    Rule("obx-first", '!has(obx.value) || obx.value != "x"'),
    Rule("doctor", '!has(pv1.attending_doctor) || pv1.attending_doctor != "x"'),
    Rule("name", 'pid.name != "x"'),
    Rule("location", '!has(pv1.assigned_location) || pv1.assigned_location != "x"'),
    Rule("type", 'msh.msg_type in ["ADT", "ORU"]'),
]
FILTERS = {"all-obx": 'obx_list.exists(o, o.status == "F")'}
HEAD = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01^ORU_R01|W1|P|2.5\rPID|1||123^^^H||DOE^JOHN\r"


def shapes(size: int) -> dict[str, str]:
    room = size - len(HEAD) - 64
    obx = "OBX|1|NM|8867-4||72|/min|||||F\r"
    tiny = "OBX|||\r"
    at_cap = obx * min(MAX_MODEL_SEGMENTS, room // len(obx))
    note = "NTE|1||" + "n" * 200 + "\r"
    return {
        "OBX at the cap, NTE padding": HEAD + at_cap + note * ((room - len(at_cap)) // len(note)),
        "many OBX": HEAD + obx * (room // len(obx)),
        "many tiny OBX": HEAD + tiny * (room // len(tiny)),
        "many components": HEAD + "PV1|1|I|W^1||||" + "^&" * (room // 2) + "\r",
        "many repetitions": HEAD + "OBX|1|ST|X||" + "a~" * (room // 2) + "\r",
        "huge name": HEAD.replace("DOE^JOHN", "D" * room),
    }


def best(fn: object, repeat: int) -> float:
    out = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out = min(out, time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="65536,262144,1048576,2097152")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rules = RuleSet(RULES, FILTERS)
    print(f"caps: {MAX_MODEL_SEGMENTS} segments, {MAX_MODEL_COMPONENTS} components per field")
    print("| frame size | message shape | answer | rules (ms) |")
    print("|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for name, text in shapes(size).items():
            message = parse_message(text.encode())

            def run(message: Message = message) -> str:
                try:
                    model = rules.model(message)
                except ModelLimitError:
                    return "AE (over the cap)"
                violation = rules.check(model)
                rules.route(model)
                return violation.ack if violation is not None else "AA"

            answer = run()
            ms = best(run, args.repeat) * 1000
            print(f"| {len(message.raw):,} | {name} | {answer} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
