"""Compare the two Python CEL libraries on mllpd's kind of expressions.

common-expression-language (module ``cel``, Rust) is what mllpd uses;
cel-python (module ``celpy``, pure Python) is the alternative that was
measured. This prints a correctness table (expected results follow the CEL
specification) and the cost of one evaluation including the conversion of
the variables, for both. cel-python is not a dependency of mllpd:

    pip install cel-python && python bench/cel_compare.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cel

try:
    import celpy
except ImportError:  # the comparison needs it; mllpd does not
    celpy = None

PID = {"id": "MRN00482913", "name": "DOE^JOHN", "dob": "19800101", "sex": "M",
       "ssn": "123-45-6789", "country": "USA"}
MSH = {"msg_type": "ADT", "trigger": "A01", "sending_app": "LOADGEN", "sending_fac": "BENCH",
       "receiving_app": "MLLPD", "receiving_fac": "HOSPITAL", "control_id": "1",
       "version": "2.5"}
PV1 = {"patient_class": "I", "assigned_location": "4WEST^401^A^HOSP",
       "attending_doctor": "1234^ATTEND^ALICE^^^DR", "admit_datetime": "20260101120000"}
OBX = [
    {"value_type": "NM", "identifier": "8867-4", "value": "72", "unit": "/min", "status": "F"},
    {"value_type": "NM", "identifier": "8480-6", "value": "128", "unit": "mm[Hg]", "status": "F"},
    {"value_type": "NM", "identifier": "8462-4", "value": "82", "unit": "mm[Hg]", "status": "F"},
    {"value_type": "NM", "identifier": "8310-5", "value": "36.9", "unit": "Cel", "status": "F"},
]
FULL: dict[str, Any] = {"msh": MSH, "pid": PID, "pv1": PV1, "obx": OBX[0], "obx_list": OBX}
NOPID: dict[str, Any] = dict(FULL, pid={}, obx={}, obx_list=[])
UNICODE: dict[str, Any] = dict(FULL, pid=dict(PID, name="MÜLLER^JÖRG"))
ERROR = "error"

CASES: list[tuple[str, dict[str, Any], object]] = [
    ('pid.id != ""', FULL, True),
    ('pid.id != ""', NOPID, ERROR),
    ('msh.msg_type in ["ADT", "ORU"]', FULL, True),
    ("has(pid.ssn)", FULL, True),
    ("has(pid.ssn)", NOPID, False),
    ('!has(pid.id) || pid.id != ""', NOPID, True),
    ("size(pid) == 0", NOPID, True),
    ('pid.id.startsWith("MRN")', FULL, True),
    ('pid.id.endsWith("913")', FULL, True),
    ('pid.id.contains("0048")', FULL, True),
    (r'pid.dob.matches("^\\d{8}$")', FULL, True),
    ("size(pid.id) == 11", FULL, True),
    ("size(pid.name) == 11", UNICODE, True),  # code points, not bytes
    ('obx_list.exists(o, o.identifier == "8867-4")', FULL, True),
    ('obx_list.all(o, o.status == "F")', FULL, True),
    ('obx_list.all(o, o.status == "F")', NOPID, True),
    ('obx_list.exists_one(o, o.identifier == "8310-5")', FULL, True),
    ('obx_list.filter(o, o.value_type == "NM").size() == 4', FULL, True),
    ('"8867-4" in obx_list.map(o, o.identifier)', FULL, True),
    ("int(obx.value) > 60", FULL, True),
    ("double(obx_list[3].value) > 36.5", FULL, True),
    ("int(obx_list[3].value) > 1", FULL, ERROR),
    ("1 / 0 == 1", FULL, ERROR),
    ("false && (1 / 0 == 1)", FULL, False),
    ("(1 / 0 == 1) || true", FULL, True),
    ('msh.version >= "2.5"', FULL, True),
    ('string(int(obx.value) * 2) == "144"', FULL, True),
    ("obx.value == 72", FULL, False),  # heterogeneous equality is false, not an error
    ('"" + 1 == "1"', FULL, ERROR),
    ("nosuch == 1", FULL, ERROR),
]


def run_rust(expr: str, variables: dict[str, Any]) -> object:
    return cel.compile(expr).execute(cel.Context(variables=variables))


def run_celpy(expr: str, variables: dict[str, Any]) -> object:
    env = celpy.Environment()
    result = env.program(env.compile(expr)).evaluate(
        {k: celpy.json_to_cel(v) for k, v in variables.items()}
    )
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def outcome(fn: Callable[[str, dict[str, Any]], object], expr: str,
            variables: dict[str, Any]) -> object:
    try:
        result = fn(expr, variables)
    except Exception:  # noqa: BLE001 - any failure counts as an error result
        return ERROR
    return bool(result) if type(result).__name__ == "BoolType" else result


def per_call(fn: Callable[[], object], n: int, repeat: int = 5) -> float:
    """Best of ``repeat`` runs, so other work on the machine stays out of it."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    engines: list[tuple[str, Callable[[str, dict[str, Any]], object]]] = [("cel (Rust)", run_rust)]
    if celpy is not None:
        engines.append(("celpy", run_celpy))
    else:
        print("cel-python is not installed: only common-expression-language is measured")
    print(f"{'expression':56} {'expected':8} " + " ".join(f"{n:12}" for n, _ in engines))
    score = dict.fromkeys((n for n, _ in engines), 0)
    for expr, variables, expected in CASES:
        cells = []
        for name, fn in engines:
            got = outcome(fn, expr, variables)
            ok = got == expected and type(got) is type(expected)
            score[name] += ok
            cells.append(f"{'ok' if ok else 'WRONG: ' + str(got)[:5]:12}")
        print(f"{expr[:56]:56} {expected!s:8} " + " ".join(cells))
    print("correct: " + ", ".join(f"{n} {s}/{len(CASES)}" for n, s in score.items()))

    print("\nmicroseconds per evaluation, variables converted each time:")
    speed_cases = [
        ('pid.id != ""', {"pid": PID}),
        ('msh.msg_type in ["ADT", "ORU"]', {"msh": MSH}),
        ('obx_list.exists(o, o.identifier == "8867-4")', {"obx_list": OBX}),
    ]
    for expr, variables in speed_cases:
        program = cel.compile(expr)
        rust = per_call(
            lambda p=program, v=variables: p.execute(cel.Context(variables=v)), 5000
        )
        line = f"  {expr:48} cel {rust:7.1f}"
        if celpy is not None:
            env = celpy.Environment()
            prog = env.program(env.compile(expr))
            py = per_call(lambda p=prog, v=variables: p.evaluate(
                {k: celpy.json_to_cel(x) for k, x in v.items()}), 500)
            line += f"   celpy {py:7.1f}"
        print(line)


if __name__ == "__main__":
    main()
