"""mllp-cli: look at and repair the outbox, from scripts or a terminal UI.

The subcommands and ``main`` are in :mod:`mllpd.cli.commands`, the terminal
UI in :mod:`mllpd.cli.app`, how both show outbox content in
:mod:`mllpd.cli.render`, and the outbox access in :mod:`mllpd.cli.store`.
"""

from mllpd.cli.commands import main

__all__ = ["main"]
