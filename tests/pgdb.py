"""A fresh database per test on the PostgreSQL that MLLPD_TEST_POSTGRES_DSN
names (.ci/postgres.sh starts one); tests that need it skip without it."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Protocol

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.trial.unittest import SkipTest

__all__ = ["DSN_VAR", "fresh_database", "private_cluster"]

DSN_VAR = "MLLPD_TEST_POSTGRES_DSN"


class _Cleanups(Protocol):
    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None: ...


def fresh_database(case: _Cleanups) -> str:
    """The URL of a new, empty database, dropped when the test ends."""
    import psycopg

    dsn = os.environ.get(DSN_VAR)
    if not dsn:
        raise SkipTest(f"{DSN_VAR} is not set (.ci/postgres.sh start runs a throwaway PostgreSQL)")
    name = f"mllpd_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    case.addCleanup(drop)
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)


POSTGRES_SH = Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh"


def private_cluster(case: _Cleanups) -> tuple[str, str]:
    """A PostgreSQL cluster of the test's own (DSN, directory), for tests
    that stop or restart it while other tests use the shared one; stopped
    when the test ends. Skips where the shared one is not set up either."""
    if not os.environ.get(DSN_VAR):
        raise SkipTest(f"{DSN_VAR} is not set (.ci/postgres.sh start runs a throwaway PostgreSQL)")
    done = subprocess.run([str(POSTGRES_SH), "start"], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"postgres.sh start failed: {done.stderr[-800:]}")
    values = dict(
        line.removeprefix("export ").split("=", 1)
        for line in done.stdout.splitlines() if line.startswith("export ")
    )
    folder = values["MLLPD_TEST_POSTGRES_DIR"]
    case.addCleanup(subprocess.run, [str(POSTGRES_SH), "stop", folder], timeout=120, check=False)
    return values["MLLPD_TEST_POSTGRES_DSN"], folder
