"""A fresh database per test on the PostgreSQL that MLLPD_TEST_POSTGRES_DSN
names (.ci/postgres.sh starts one); tests that need it skip without it."""

from __future__ import annotations

import os
import uuid
from typing import Any, Protocol

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.trial.unittest import SkipTest

__all__ = ["DSN_VAR", "fresh_database"]

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
