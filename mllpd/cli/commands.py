"""mllp-cli's commands: the argument parser, one function per subcommand,
and ``main``, the entry point of the ``mllp-cli`` console script.

Exit codes: 0 done; 1 nothing done (no such message, not a dead letter,
confirmation declined); 2 bad usage or an outbox that cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import NamedTuple, TextIO

from mllpd.cli.render import format_age, plain, render_message, timestamp
from mllpd.cli.store import STATES, Store, StoreError, open_store
from mllpd.config import parse_duration

__all__ = ["EXIT_NOTHING", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_NOTHING = 1
EXIT_USAGE = 2


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in headers]] + [["" if c is None else plain(str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        out.write(line.rstrip() + "\n")


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    # The prompt goes to stderr so stdout stays clean for scripts.
    sys.stderr.write(f"{plain(question)} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        # A piped answer is not echoed: end the prompt's line ourselves.
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def _cmd_stats(store: Store, args: argparse.Namespace, now: float) -> int:
    stats = store.stats(now)
    if args.json:
        json.dump([asdict(s) for s in stats], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not stats:
        print("no queued, delivered or dead messages")
        return EXIT_OK
    _table(
        ["connector", "pending", "in_flight", "delivered", "dead", "oldest", "retrying"],
        [
            [s.connector, s.pending, s.in_flight, s.delivered, s.dead,
             format_age(s.oldest_pending_age), s.retrying]
            for s in stats
        ],
        sys.stdout,
    )
    return EXIT_OK


def _cmd_list(store: Store, args: argparse.Namespace, now: float) -> int:
    rows = store.messages(now, connector=args.connector, state=args.state, limit=args.limit)
    if args.json:
        json.dump([asdict(r) for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    _table(
        ["message_id", "connector", "state", "type", "control_id", "size", "age",
         "attempts", "last_error", "preview"],
        [
            [r.message_id, r.connector, r.state, r.msg_type, r.control_id, r.size,
             format_age(r.age), r.attempts, _short(r.last_error, 40), r.preview]
            for r in rows
        ],
        sys.stdout,
    )
    return EXIT_OK


def _short(text: str | None, n: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cmd_show(store: Store, args: argparse.Namespace, now: float) -> int:
    detail = store.message(args.message_id)
    if detail is None:
        print(f"mllp-cli: no message {args.message_id}", file=sys.stderr)
        return EXIT_NOTHING
    sys.stdout.write("\n".join(render_message(detail, now)) + "\n")
    return EXIT_OK


def _cmd_audit(store: Store, args: argparse.Namespace, now: float) -> int:
    since = now - args.since.seconds if args.since is not None else None
    rows = store.audit(
        limit=args.limit, control_id=args.control_id, ack_code=args.code,
        peer=args.peer, since=since,
    )
    if args.json:
        json.dump([asdict(r) for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    _table(
        ["received", "peer", "client", "type", "control_id", "size", "ack", "rule",
         "connectors", "message_id", "batch"],
        [
            [timestamp(r.received_at), r.peer, r.client_subject or "", r.msg_type,
             r.control_id, r.size, r.ack_code, r.rule or "", r.connectors, r.message_id or "",
             r.batch_control_id or ""]
            for r in rows
        ],
        sys.stdout,
    )
    return EXIT_OK


def _cmd_replay(store: Store, args: argparse.Namespace, now: float) -> int:
    wanted: list[str] | None = None if args.all else list(args.message_ids)
    if wanted is None:
        count = len(store.dead_letters(args.connector))
        if count == 0:
            print(f"mllp-cli: no dead letters for connector {args.connector}", file=sys.stderr)
            return EXIT_NOTHING
    else:
        count = len(wanted)
    question = (
        f"Re-queue {count} dead letter{'s' if count != 1 else ''} of connector "
        f"{args.connector!r} at the tail of its queue?"
    )
    if not _confirm(args, question):
        print("mllp-cli: nothing replayed", file=sys.stderr)
        return EXIT_NOTHING
    done = store.replay(args.connector, wanted, now)
    for mid in done:
        print(f"replayed {mid}")
    missing = [] if wanted is None else [m for m in wanted if m not in set(done)]
    for mid in missing:
        print(f"mllp-cli: {mid} is not a dead letter of {args.connector}", file=sys.stderr)
    return EXIT_OK if done and not missing else EXIT_NOTHING


def _cmd_delete(store: Store, args: argparse.Namespace, now: float) -> int:
    detail = store.message(args.message_id)
    if detail is None:
        print(f"mllp-cli: no message {args.message_id}", file=sys.stderr)
        return EXIT_NOTHING
    queues = ", ".join(f"{q.connector} ({q.state})" for q in detail.deliveries) or "none"
    question = (
        f"Delete message {detail.message_id} ({detail.msg_type} {detail.control_id}) and its "
        f"queue entries [{queues}]? Its audit record stays."
    )
    if not _confirm(args, question):
        print("mllp-cli: nothing deleted", file=sys.stderr)
        return EXIT_NOTHING
    if not store.delete(detail.message_id):
        print(f"mllp-cli: no message {args.message_id}", file=sys.stderr)
        return EXIT_NOTHING
    print(f"deleted {detail.message_id}")
    return EXIT_OK


def _cmd_purge(store: Store, args: argparse.Namespace, now: float) -> int:
    purge: Callable[[], int]
    if args.dead:
        count = store.count(args.connector, "dead")
        what = f"dead letter{'s' if count != 1 else ''} of connector {args.connector!r}"
        purge = lambda: store.purge_dead(args.connector)  # noqa: E731
    else:
        before = now - args.delivered_before.seconds
        count = store.count(args.connector, "delivered", updated_before=before)
        what = (
            f"delivered message{'s' if count != 1 else ''} of connector {args.connector!r} "
            f"older than {args.delivered_before.text}"
        )
        purge = lambda: store.purge_delivered(args.connector, before)  # noqa: E731
    if count == 0:
        print(f"no {what}")
        return EXIT_OK
    if not _confirm(args, f"Purge {count} {what}? Audit records stay."):
        print("mllp-cli: nothing purged", file=sys.stderr)
        return EXIT_NOTHING
    removed = purge()
    print(f"purged {removed} {what}")
    return EXIT_OK


class Duration(NamedTuple):
    seconds: float
    text: str


def _duration(text: str) -> Duration:
    try:
        return Duration(parse_duration(text), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected a duration such as 24h or 30m") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def build_parser() -> argparse.ArgumentParser:
    db_help = "outbox file (default: $MLLP_DB_PATH or outbox.db, as the server)"
    parser = argparse.ArgumentParser(
        prog="mllp-cli",
        description="Look at and repair the mllpd outbox. Without a command: the terminal UI.",
    )
    url_help = (
        "the PostgreSQL outbox of a cluster (default: $MLLP_DB_URL unless --db is given)"
    )
    parser.add_argument("--db", metavar="PATH", help=db_help)
    parser.add_argument("--db-url", metavar="URL", help=url_help)
    # --db is accepted after the command too; SUPPRESS keeps the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help=db_help)
    common.add_argument("--db-url", metavar="URL", default=argparse.SUPPRESS, help=url_help)
    confirm = argparse.ArgumentParser(add_help=False)
    confirm.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("stats", parents=[common], help="queue and dead-letter counts per connector")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("list", parents=[common], help="messages in queues")
    p.add_argument("--connector", "-c", help="only this connector")
    p.add_argument("--state", "-s", choices=STATES, help="only this state")
    p.add_argument("--limit", "-n", type=_positive, default=50, help="at most N rows (50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "audit", parents=[common], help="the audit trail: every received message, newest first",
    )
    p.add_argument("--control-id", help="only this MSH-10")
    p.add_argument("--code", choices=("AA", "AE", "AR", "CA", "CE", "CR"), help="only this ACK code")
    p.add_argument("--peer", help="only this peer (host:port as logged)")
    p.add_argument("--since", type=_duration, metavar="DURATION", help="only the last DURATION (1h, 30m)")
    p.add_argument("--limit", "-n", type=_positive, default=50, help="at most N rows (50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("show", parents=[common], help="one message, field by field")
    p.add_argument("message_id", metavar="MESSAGE_ID")

    p = sub.add_parser(
        "replay", parents=[common, confirm],
        help="re-queue dead letters at the tail of their connector's queue",
    )
    p.add_argument("--connector", "-c", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("message_ids", metavar="MESSAGE_ID", nargs="*", default=[])
    which.add_argument("--all", action="store_true", help="every dead letter of the connector")

    p = sub.add_parser(
        "delete", parents=[common, confirm],
        help="remove one message and its queue entries (the audit record stays)",
    )
    p.add_argument("message_id", metavar="MESSAGE_ID")

    p = sub.add_parser(
        "purge", parents=[common, confirm],
        help="remove a connector's dead letters, or its delivered messages older than a duration",
    )
    p.add_argument("--connector", "-c", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dead", action="store_true", help="the whole dead-letter queue")
    what.add_argument(
        "--delivered-before", metavar="DURATION", type=_duration,
        help="delivered rows older than this (Go syntax: 24h, 30m, 1h30m)",
    )

    p = sub.add_parser("tui", parents=[common], help="the terminal UI (the default)")
    p.add_argument(
        "--interval", type=_duration, default=Duration(2.0, "2s"), metavar="DURATION",
        help="refresh interval (default 2s)",
    )
    return parser


_COMMANDS: dict[str, Callable[[Store, argparse.Namespace, float], int]] = {
    "stats": _cmd_stats,
    "list": _cmd_list,
    "show": _cmd_show,
    "audit": _cmd_audit,
    "replay": _cmd_replay,
    "delete": _cmd_delete,
    "purge": _cmd_purge,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mllp-cli`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "tui"
    if command == "tui" and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("mllp-cli: the terminal UI needs a terminal; for scripts use a command:"
              f" {', '.join(_COMMANDS)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = open_store(args.db, args.db_url)
    except StoreError as e:
        print(f"mllp-cli: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if command == "tui":
            from mllpd.cli.app import OutboxApp

            interval = getattr(args, "interval", None)
            OutboxApp(store, interval=interval.seconds if interval else 2.0).run()
            return EXIT_OK
        return _COMMANDS[command](store, args, time.time())
    except StoreError as e:
        print(f"mllp-cli: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()
