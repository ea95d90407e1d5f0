"""The mllp-cli terminal UI (Textual): connectors, their queues, one message,
and the repairs (replay, delete, purge), each behind a confirmation.

Every outbox call runs on one dedicated thread, so a write waiting for the
server's commit never freezes the screen, and the sqlite3 connection is only
ever used by that one thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, ClassVar, TypeVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Label, Static

from mllpd.cli.render import format_age, plain, render_message
from mllpd.cli.store import ConnectorStats, MessageDetail, MessageRow, Store, StoreError

__all__ = ["ConfirmScreen", "MessageScreen", "OutboxApp"]

T = TypeVar("T")

# The message list's state filter cycles through these; None is every state.
FILTERS: tuple[str | None, ...] = ("dead", "pending", "in_flight", "delivered", None)
MESSAGE_LIMIT = 500
_MAIN_SCREEN_ACTIONS = frozenset(
    {"cycle_state", "view", "replay", "replay_all", "delete", "purge", "reload"}
)


def _cell(value: object) -> object:
    # DataTable reads a str cell as Rich markup: "A[/]" in a control id
    # would break the table, "[link=...]" would add a link. Text is shown as is.
    return Text(plain(value), no_wrap=True, end="") if isinstance(value, str) else value


def _fill(table: DataTable[Any], rows: list[tuple[str, tuple[object, ...]]]) -> None:
    """Show ``(key, cells)`` rows. When the same rows are shown already, only
    their cells change, so the cursor and scroll position stay where the
    user left them on every refresh. Strings are shown as plain text."""
    rows = [(key, tuple(_cell(c) for c in cells)) for key, cells in rows]
    keys = [key for key, _ in rows]
    current = [str(row.key.value) for row in table.ordered_rows]
    if keys == current:
        columns = [column.key for column in table.ordered_columns]
        for key, cells in rows:
            for column, value in zip(columns, cells, strict=True):
                table.update_cell(key, column, value)
        return
    selected: str | None = None
    if table.row_count:
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        selected = str(row_key.value)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected in keys:
        table.move_cursor(row=keys.index(selected), scroll=False)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only for yes."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    #dialog { width: 70; height: auto; border: thick $warning; padding: 1 2;
              background: $surface; }
    #question { width: 100%; margin-bottom: 1; }
    #buttons { width: 100%; height: auto; align-horizontal: right; }
    #buttons Button { margin-left: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(plain(self.question), id="question", markup=False)
            with Horizontal(id="buttons"):
                yield Button("Yes", id="yes", variant="error")
                yield Button("No", id="no", variant="primary")

    def on_mount(self) -> None:
        # The safe answer has the focus: Enter alone never destroys anything.
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class MessageScreen(Screen[None]):
    """One message: what is known about it, then each segment and its named
    fields."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,backspace", "app.pop_screen", "Back"),
    ]

    def __init__(self, detail: MessageDetail, now: float) -> None:
        super().__init__()
        self.detail = detail
        self.lines = render_message(detail, now)
        self._segment_lines = {plain(segment.text) for segment in detail.segments()}

    def compose(self) -> ComposeResult:
        yield Header()
        text = Text()
        for line in self.lines:
            # Segments stand out; their named fields are indented below them.
            text.append(line + "\n", style="bold" if line in self._segment_lines else "")
        with VerticalScroll():
            yield Static(text, id="message-body")
        yield Footer()


class OutboxApp(App[None]):
    """Connectors with queue and dead-letter counts, refreshed every
    ``interval`` seconds; the selected connector's messages below."""

    TITLE = "mllp-cli"
    CSS = """
    #connectors { height: auto; max-height: 40%; }
    #messages { height: 1fr; }
    .caption { padding: 0 1; background: $boost; width: 100%; }
    #status { padding: 0 1; height: 1; width: 100%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "cycle_state", "State filter"),
        Binding("v", "view", "View"),
        Binding("r", "replay", "Replay"),
        Binding("a", "replay_all", "Replay all dead"),
        Binding("d", "delete", "Delete"),
        Binding("p", "purge", "Purge dead"),
        Binding("g", "reload", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.store = store
        self.interval = interval
        self.clock = clock
        self.connector: str | None = None
        self.state: str | None = FILTERS[0]
        self.stats: list[ConnectorStats] = []
        self.rows: dict[str, MessageRow] = {}
        self.reloads = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllp-cli-db")

    # -- layout ------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("Connectors", classes="caption")
        yield DataTable(id="connectors", cursor_type="row", zebra_stripes=True)
        yield Label("", id="filter", classes="caption", markup=False)
        yield DataTable(id="messages", cursor_type="row", zebra_stripes=True)
        yield Label("", id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.store.path
        connectors = self.query_one("#connectors", DataTable)
        connectors.add_columns(
            "connector", "pending", "lanes in flight", "delivered", "dead", "oldest",
            "lanes retrying",
        )
        messages = self.query_one("#messages", DataTable)
        messages.add_columns(
            "message id", "connector", "state", "type", "control id", "size", "age",
            "attempts", "last error", "preview",
        )
        self._show_filter()
        self.run_worker(self.reload(), group="reload", exclusive=True)
        if self.interval > 0:
            self.set_interval(self.interval, self._tick)

    def on_unmount(self) -> None:
        self._executor.shutdown(wait=True)

    def _tick(self) -> None:
        self.run_worker(self.reload(), group="reload", exclusive=True)

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    # -- data --------------------------------------------------------------

    async def reload(self) -> None:
        """Read the counts and the selected queue again and redraw both."""
        now = self.clock()
        try:
            stats = await self._db(self.store.stats, now)
            if self.connector is None and stats:
                self.connector = stats[0].connector
            rows = await self._db(
                self.store.messages, now, connector=self.connector, state=self.state,
                limit=MESSAGE_LIMIT,
            ) if self.connector is not None else []
        except StoreError as e:
            self.set_status(f"outbox error: {e}")
            return
        self.stats = stats
        self._fill_connectors(stats)
        self._fill_messages(rows)
        self._show_filter()
        self.reloads += 1

    def _fill_connectors(self, stats: list[ConnectorStats]) -> None:
        _fill(self.query_one("#connectors", DataTable), [
            (s.connector, (s.connector, s.pending, s.in_flight, s.delivered, s.dead,
                           format_age(s.oldest_pending_age), s.retrying))
            for s in stats
        ])
        names = [s.connector for s in stats]
        if self.connector not in names:
            self.connector = names[0] if names else None

    def _fill_messages(self, rows: list[MessageRow]) -> None:
        self.rows = {str(r.seq): r for r in rows}
        _fill(self.query_one("#messages", DataTable), [
            (str(r.seq), (r.message_id, r.connector, r.state, r.msg_type, r.control_id, r.size,
                          format_age(r.age), r.attempts, (r.last_error or "")[:60], r.preview))
            for r in rows
        ])

    def _show_filter(self) -> None:
        state = self.state or "all states"
        self.query_one("#filter", Label).update(
            plain(f"Messages of {self.connector or '-'}: {state}  (s: change)")
        )

    def set_status(self, text: str) -> None:
        self.query_one("#status", Label).update(plain(text))

    @property
    def status(self) -> str:
        return str(self.query_one("#status", Label).render())

    def selected_message(self) -> MessageRow | None:
        table = self.query_one("#messages", DataTable)
        if table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return self.rows.get(str(row_key.value))

    # -- events ------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id != "connectors" or event.row_key.value is None:
            return
        connector = str(event.row_key.value)
        if connector != self.connector:
            self.connector = connector
            self.run_worker(self.reload(), group="reload", exclusive=True)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "messages":
            self.action_view()

    # -- actions -----------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Over the message view, keys belong to that screen: "d" there must
        # not open a delete dialog for whatever row is selected underneath.
        if action in _MAIN_SCREEN_ACTIONS and len(self.screen_stack) > 1:
            return False
        return True

    def action_cycle_state(self) -> None:
        self.state = FILTERS[(FILTERS.index(self.state) + 1) % len(FILTERS)]
        self._show_filter()
        self.run_worker(self.reload(), group="reload", exclusive=True)

    def action_reload(self) -> None:
        self.run_worker(self.reload(), group="reload", exclusive=True)

    def action_view(self) -> None:
        row = self.selected_message()
        if row is not None:
            self.run_worker(self._guarded(partial(self._view, row.message_id)), group="action")

    async def _view(self, message_id: str) -> None:
        detail = await self._db(self.store.message, message_id)
        if detail is None:
            self.set_status(f"message {message_id} is gone")
            return
        await self.push_screen(MessageScreen(detail, self.clock()))

    def action_replay(self) -> None:
        row = self.selected_message()
        if row is None:
            return
        if row.state != "dead":
            self.set_status("only dead letters can be replayed")
            return
        self._ask(
            f"Re-queue dead letter {row.message_id} ({row.msg_type} {row.control_id}) "
            f"at the tail of {row.connector}'s queue?",
            partial(self._replay, row.connector, [row.message_id]),
        )

    def action_replay_all(self) -> None:
        connector = self.connector
        dead = next((s.dead for s in self.stats if s.connector == connector), 0)
        if connector is None or dead == 0:
            self.set_status("no dead letters to replay")
            return
        self._ask(
            f"Re-queue all {dead} dead letters of {connector} at the tail of its queue?",
            partial(self._replay, connector, None),
        )

    async def _replay(self, connector: str, ids: list[str] | None) -> None:
        done = await self._db(self.store.replay, connector, ids, self.clock())
        self.set_status(f"replayed {len(done)} dead letter(s) of {connector}")
        await self.reload()

    def action_delete(self) -> None:
        row = self.selected_message()
        if row is None:
            return
        self._ask(
            f"Delete message {row.message_id} ({row.msg_type} {row.control_id}) and all its "
            "queue entries? Its audit record stays.",
            partial(self._delete, row.message_id),
        )

    async def _delete(self, message_id: str) -> None:
        gone = await self._db(self.store.delete, message_id)
        self.set_status(f"deleted {message_id}" if gone else f"message {message_id} was gone")
        await self.reload()

    def action_purge(self) -> None:
        connector = self.connector
        dead = next((s.dead for s in self.stats if s.connector == connector), 0)
        if connector is None or dead == 0:
            self.set_status("no dead letters to purge")
            return
        self._ask(
            f"Purge all {dead} dead letters of {connector}? Audit records stay.",
            partial(self._purge, connector),
        )

    async def _purge(self, connector: str) -> None:
        removed = await self._db(self.store.purge_dead, connector)
        self.set_status(f"purged {removed} dead letter(s) of {connector}")
        await self.reload()

    async def _guarded(self, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # A busy or broken outbox is reported; the UI stays up.
        try:
            await action()
        except StoreError as e:
            self.set_status(f"outbox error: {e}")

    def _ask(self, question: str, then: Callable[[], Coroutine[Any, Any, None]]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._guarded(then), group="action")
            else:
                self.set_status("cancelled")

        self.push_screen(ConfirmScreen(question), answered)

