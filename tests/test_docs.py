"""The README and docs/ stay true: the quick start's commands parse and
name extras that exist, every setting, bench script and mllp-cli subcommand
they name exists, and every relative link and anchor resolves."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.serverproc import _TWISTD, REPO, query, start_server

README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
HELP_TIMEOUT = 60.0

# First words of the code blocks that are shell commands (others are output,
# YAML, HL7 or SQL).
COMMANDS = frozenset({
    "pip", "python", "python3", "twistd", "mllp-cli", "eval", "bash", "kubectl",
    "docker", "sqlite3", ".ci/postgres.sh",
})


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(markdown: str, heading: str) -> str:
    """The body of the section under `heading` (to the next heading of its level or above)."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", markdown, re.M)
    if match is None:
        raise AssertionError(f"no section {heading!r}")
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(markdown, match.end())
    return markdown[match.end():end.start() if end else len(markdown)]


def code_blocks(markdown: str) -> Iterator[str]:
    """Fenced blocks and indented blocks (after a blank line, outside lists)."""
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield "\n".join(lines[i + 1:j])
            i = j + 1
        elif line.startswith("    ") and (i == 0 or lines[i - 1] == "") and line.strip():
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or lines[j] == ""):
                j += 1
            yield "\n".join(x[4:] for x in lines[i:j]).strip("\n")
            i = j
        else:
            i += 1


def shell_blocks(markdown: str) -> list[str]:
    """Code blocks of commands, leaving out usage synopses (``[--json]``, ``(A | B)``)."""
    return [
        b for b in code_blocks(markdown)
        if b.split(None, 1) and b.split(None, 1)[0] in COMMANDS and "[--" not in b
    ]


def prose(markdown: str) -> str:
    """The text without fenced code blocks (links in them are not links)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    heading = re.sub(r"`|\*\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#+ (.+)$", prose(markdown), re.M):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def run(argv: list[str]) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT,
    )
    if done.returncode != 0:
        raise AssertionError(f"{argv[1:]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


@cache
def twistd_help() -> str:
    return run([sys.executable, "-c", _TWISTD, "mllp", "--help"])


@cache
def cli_help() -> str:
    return run([sys.executable, "-m", "mllpd.cli", "--help"])


def settings_table() -> list[tuple[str, str]]:
    """(variables, options) of each row of docs/configuration.md's settings table."""
    rows = []
    for line in section(text(CONFIGURATION), "Settings").split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and cells[0] not in ("variable", "---"):
            rows.append((cells[0], cells[1]))
    return rows


class QuickStartTests(SynchronousTestCase):
    """The README's quick start, as a newcomer types it."""

    def commands(self) -> list[str]:
        return shell_blocks(section(text(README), "Quick start"))

    def test_quick_start_has_server_and_tests(self) -> None:
        """The quick start installs and starts the server, and installs and runs the tests."""
        commands = self.commands()
        self.assertIn("pip install . && twistd -n mllp", commands)
        self.assertIn("pip install '.[test]' && python -m pytest tests", commands)

    def test_shell_blocks_parse(self) -> None:
        """Every shell block of the README and docs/ parses with bash -n."""
        checked = 0
        for path in documents():
            for block in shell_blocks(text(path)):
                done = subprocess.run(
                    ["bash", "-n"], input=block, capture_output=True, text=True,
                    timeout=HELP_TIMEOUT,
                )
                self.assertEqual(done.returncode, 0, f"{path.name}: {block!r}: {done.stderr}")
                checked += 1
        self.assertGreaterEqual(checked, len(self.commands()))

    def test_send_by_hand_gets_the_documented_ack(self) -> None:
        """The quick start's one-line sender, run against the real server, prints an AA as shown."""
        quick = section(text(README), "Quick start")
        [sender] = [b for b in shell_blocks(quick) if b.startswith("python3 -c")]
        [shown] = [b for b in code_blocks(quick) if b.startswith("MSH|")]
        server = start_server(self)
        port = server.port
        self.assertIn("2575", sender)
        done = subprocess.run(
            ["bash", "-c", sender.replace("2575", str(port))],
            capture_output=True, text=True, timeout=HELP_TIMEOUT,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        got, want = done.stdout.strip().split("\n"), shown.split("\n")
        # The ACK's time (MSH-7) and control id (MSH-10) are new each time.
        self.assertEqual(
            [[f for i, f in enumerate(line.split("|")) if i not in (6, 9)] for line in got],
            [[f for i, f in enumerate(line.split("|")) if i not in (6, 9)] for line in want],
        )
        self.assertEqual(query(server.db_path, "SELECT control_id FROM messages"), [("MSG0001",)])

    def test_pip_extras_exist(self) -> None:
        """Every `pip install '.[extra]'` in the docs names an extra of setup.cfg."""
        parser = configparser.ConfigParser()
        parser.read(REPO / "setup.cfg")
        extras = set(parser["options.extras_require"])
        named = set()
        for path in documents():
            for group in re.findall(r"pip install '?\.\[([\w,-]+)\]", text(path)):
                named.update(group.split(","))
        self.assertIn("test", named)
        self.assertEqual(named - extras, set())


class SettingsTests(SynchronousTestCase):
    """The settings the docs name are the settings the server has."""

    def test_options_in_twistd_help(self) -> None:
        """`twistd mllp --help` lists every option and variable of the settings table."""
        rows = settings_table()
        self.assertGreater(len(rows), 20)
        usage = twistd_help()
        for variables, options in rows:
            for option in re.findall(r"`(-[-\w]+)`", options):
                self.assertTrue(re.search(rf"(?<![-\w]){re.escape(option)}\b", usage), option)
            if options:
                for variable in re.findall(r"[A-Z][A-Z_]+", variables):
                    self.assertIn(variable, usage)

    def test_readme_summary_names_every_variable(self) -> None:
        """The README's settings summary names exactly the variables of the full table."""
        full = {v for variables, _ in settings_table() for v in re.findall(r"[A-Z][A-Z_]+", variables)}
        summary = set(re.findall(r"\b[A-Z][A-Z_]{3,}\b", section(text(README), "Settings")))
        self.assertEqual(full, summary)


class CommandTests(SynchronousTestCase):
    """Every script and subcommand the docs tell you to run exists."""

    def test_bench_scripts_exist(self) -> None:
        """Every bench/X.py named in the README or docs/ is a file of the checkout."""
        named = set()
        for path in documents():
            named.update(re.findall(r"(?<![\w./])bench/(\w+\.py)", text(path)))
        self.assertIn("run.py", named)
        missing = sorted(n for n in named if not (REPO / "bench" / n).is_file())
        self.assertEqual(missing, [])

    def test_cli_subcommands_exist(self) -> None:
        """Every `mllp-cli SUBCOMMAND` in the README or docs/ is one `mllp-cli --help` lists."""
        # argparse lists each subcommand indented, then its help after two spaces.
        known = set(re.findall(r"^ {4}([a-z][a-z-]*) {2,}\S", cli_help(), re.M))
        self.assertIn("stats", known)
        named = set()
        for path in documents():
            named.update(re.findall(r"\bmllp-cli ([a-z][a-z-]*)", text(path)))
        self.assertIn("replay", named)
        self.assertEqual(named - known, set())


class LinkTests(SynchronousTestCase):
    """Links between the README and docs/ lead somewhere."""

    def test_relative_links_and_anchors_resolve(self) -> None:
        """Every relative link resolves to a file, and every #anchor to a heading there."""
        broken = []
        count = 0
        for path in documents():
            for target in re.findall(r"\]\(([^)\s]+)\)", prose(text(path))):
                if re.match(r"[a-z]+:", target):
                    continue
                count += 1
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                if not dest.exists():
                    broken.append(f"{path.name}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(text(dest)):
                    broken.append(f"{path.name}: {target} (no such heading)")
        self.assertGreater(count, 20)
        self.assertEqual(broken, [])

    def test_slug_matches_github(self) -> None:
        """Anchors are made as GitHub makes them, punctuation dropped and spaces hyphenated."""
        self.assertEqual(
            slug("Chaos: kill -9, SIGTERM, a full disk and a flapping upstream"),
            "chaos-kill--9-sigterm-a-full-disk-and-a-flapping-upstream",
        )
        self.assertEqual(slug("Delivery to slow upstreams (lanes)"), "delivery-to-slow-upstreams-lanes")


class ModuleMapTests(SynchronousTestCase):
    """docs/development.md's module map keeps up with mllpd/."""

    def test_every_module_has_a_line(self) -> None:
        """Every module under mllpd/ has a row in the module map, and every row is a module."""
        mapped = set(re.findall(r"^\| `(mllpd/[\w/]+\.py)` \|", text(DOCS / "development.md"), re.M))
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / "mllpd").rglob("*.py")}
        self.assertEqual((sorted(modules - mapped), sorted(mapped - modules)), ([], []))
