"""Per-message cost of CEL rules and connector filters.

Runs RuleSet.model + check + route over N parsed 1 KB ADT^A01 messages (the
load generator's) and prints microseconds per message for several rule sets.
Parsing is not counted (the receiver has already parsed the message); the
model (finding the segments, building the maps, converting them to CEL) is.

    python bench/rules.py [--messages 20000] [--repeat 5]

Each figure is the best of --repeat runs, to keep other processes on a
shared machine out of the number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402

from mllpd.hl7 import Message, parse_message  # noqa: E402
from mllpd.rules import Rule, RuleSet  # noqa: E402

ONE_RULE = [Rule("patient-id-required", 'pid.id != ""', "PID-3 is required")]
FIVE_RULES = [
    *ONE_RULE,
    Rule("known-type", 'msh.msg_type in ["ADT", "ORU", "ORM"]'),
    Rule("dob-length", "size(pid.dob) == 8"),
    Rule("sex-coded", 'pid.sex in ["M", "F", "O", "U", "A", "N"]'),
    Rule("inpatient-has-location", 'pv1.patient_class != "I" || pv1.assigned_location != ""'),
]
# The same with a regular expression, which the engine compiles per call.
FIVE_WITH_REGEX = [
    *FIVE_RULES[:2], Rule("dob-format", 'pid.dob.matches("^[0-9]{8}$")'), *FIVE_RULES[3:],
]
SPEC_FILTERS = {
    "ehr": 'msh.msg_type in ["ADT", "ORU"]',
    "lake": None,
    "archive": None,
}
OBX_RULE = [Rule("heart-rate-plausible",
                 'obx_list.all(o, o.identifier != "8867-4" || int(o.value) < 300)')]


def per_message(messages: list[Message], fn: Callable[[Message], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for m in messages:
            fn(m)
        best = min(best, time.perf_counter() - start)
    return best / len(messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    prefix, suffix = loadgen.build_template(1024, "20260101120000")
    messages = [
        parse_message(prefix + f"{i:0{loadgen.CTRL_ID_LEN}d}".encode() + suffix)
        for i in range(args.messages)
    ]
    print(f"{len(messages[0].raw)}-byte ADT^A01, {args.messages} messages, "
          f"best of {args.repeat}; microseconds per message")

    def full(rs: RuleSet) -> Callable[[Message], object]:
        def run(m: Message) -> object:
            model = rs.model(m)
            return rs.check(model), rs.route(model)
        return run

    cases: list[tuple[str, RuleSet]] = [
        ("1 rule (pid.id != \"\")", RuleSet(ONE_RULE)),
        ("5 rules (msh, pid, pv1)", RuleSet(FIVE_RULES)),
        ("5 rules, one of them matches()", RuleSet(FIVE_WITH_REGEX)),
        ("filters only (SPEC 6: 3 connectors, 1 filter)", RuleSet((), SPEC_FILTERS)),
        ("1 rule + SPEC 6 filters", RuleSet(ONE_RULE, SPEC_FILTERS)),
        ("5 rules + SPEC 6 filters", RuleSet(FIVE_RULES, SPEC_FILTERS)),
        ("1 obx_list rule (5 OBX)", RuleSet(OBX_RULE)),
        ("no rules, no filters", RuleSet()),
    ]
    for label, rs in cases:
        total = per_message(messages, full(rs), args.repeat)
        build = per_message(messages, rs.model, args.repeat)
        print(f"  {label:48} {total:6.2f}   model alone {build:5.2f}")
    print("one rule on a model already built (the cost of adding it to a rule set):")
    for rule in [*FIVE_RULES, FIVE_WITH_REGEX[2], *OBX_RULE]:
        rs = RuleSet([rule])
        warm = rs.model(messages[0])
        each = per_message(messages, lambda _m, rs=rs, warm=warm: rs.check(warm), args.repeat)
        print(f"  {rule.expr[:60]:60} {each:6.2f}")


if __name__ == "__main__":
    main()
