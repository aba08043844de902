"""The session-wide leak hunt and the hostile-case figures: a pytest plugin, registered by conftest.

Leak hunt: every secret the tests make or receive is registered (`register_secret`), every text
secret-init produced is recorded (`record_output`), and at the end of the session each text is
searched for each value and its common encodings (base64 at any alignment, hex, URL- and
JSON-escaped). Values sitting in output *files* are where they belong and are never searched;
only outputs count: logs, status files, the app's environment and argv, /proc, `docker history`.

Figures: tests marked `@pytest.mark.hostile("config")` (one of HOSTILE_CLASSES) are counted per
class with their outcomes, and fuzz tests add their example counts and the exit codes of the
inputs they saw refused with `record_cases`. Both are written to `.test-figures/` at session end.
"""

import base64
import bisect
import json
import os
import stat
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

HOSTILE_CLASSES = ("config", "filesystem", "vault-answers", "app-user", "signals", "faults")
FIGURES_DIR = Path(__file__).resolve().parent.parent / ".test-figures"  # SITEST_FIGURES_DIR overrides
# Shorter needles (a partial base64 group, a 4-byte hex string) would match by chance.
MIN_NEEDLE = 12
# Output files bigger than this are filler (a full tmpfs), not credentials.
MAX_HARVEST_BYTES = 64 * 1024
SECRET_NAME_HINTS = ("pass", "secret", "token", "key", "cred")
STATE_DIR = ".secret-init"  # in an output dir: status.json and locks, never a value


# -- encodings --------------------------------------------------------------------


def _base64_at_every_alignment(raw: bytes, encode: Any) -> Iterator[str]:
    """The part of base64(raw) that is the same wherever `raw` sits inside a longer encoded blob."""
    for shift in range(3):
        text: str = encode(b"\0" * shift + raw).decode().rstrip("=")
        start = 4 if shift else 0  # the first group mixes in the bytes before `raw`
        whole_groups = (shift + len(raw)) // 3 * 4  # the last partial group mixes in the bytes after
        yield text[start:whole_groups]


def encodings(value: str) -> dict[str, str]:
    """Each form `value` could take in a log or a file: name -> needle, only the long enough ones."""
    raw = value.encode()
    forms: dict[str, str] = {"raw": value}
    for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        for shift, needle in enumerate(_base64_at_every_alignment(raw, encode)):
            forms[f"{name}+{shift}"] = needle
    forms["hex"] = raw.hex()
    forms["HEX"] = raw.hex().upper()
    forms["url"] = urllib.parse.quote(value, safe="")
    forms["url+plus"] = urllib.parse.quote_plus(value)
    forms["json"] = json.dumps(value)[1:-1]
    forms["json-unicode"] = json.dumps(value, ensure_ascii=False)[1:-1]
    unique: dict[str, str] = {}
    for name, needle in forms.items():
        if len(needle) >= MIN_NEEDLE and needle not in unique.values():
            unique[name] = needle
    return unique


# -- the registry -----------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    value_source: str
    encoding: str
    text_label: str
    offset: int

    def __str__(self) -> str:
        return f"a {self.value_source} value ({self.encoding}) in {self.text_label} at offset {self.offset}"


@dataclass
class LeakRegistry:
    values: dict[str, str] = field(default_factory=dict)  # value -> where it came from
    texts: list[tuple[str, str]] = field(default_factory=list)  # (label, text)
    too_short: int = 0  # values refused for being too short to search for without false alarms

    def add_value(self, value: str, source: str) -> None:
        if len(value) < MIN_NEEDLE:
            self.too_short += 1
            return
        self.values.setdefault(value, source)

    def add_text(self, text: str, label: str) -> None:
        if text:
            self.texts.append((label, text))


def find_leaks(values: dict[str, str], texts: list[tuple[str, str]]) -> list[Leak]:
    """Every (value, encoding) found in any text, reported at its first place."""
    if not texts:
        return []
    blob = "\0".join(text for _, text in texts)  # one search per needle, not one per text
    starts = list(_offsets(text for _, text in texts))
    leaks = []
    for value, source in values.items():
        for encoding, needle in encodings(value).items():
            at = blob.find(needle)
            if at >= 0:
                index = bisect.bisect_right(starts, at) - 1
                leaks.append(Leak(source, encoding, texts[index][0], at - starts[index]))
    return leaks


def _offsets(texts: Iterable[str]) -> Iterator[int]:
    at = 0
    for text in texts:
        yield at
        at += len(text) + 1


# -- hostile figures -----------------------------------------------------------------


@dataclass
class ClassFigures:
    outcomes: Counter[str] = field(default_factory=Counter)  # test outcome -> tests
    cases: Counter[str] = field(default_factory=Counter)  # test outcome -> cases (inputs) tried
    rejected_exit_codes: Counter[int] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "tests": dict(self.outcomes),
            "cases_tried": sum(self.cases.values()),
            "cases_by_test_outcome": dict(self.cases),
            "rejected_exit_codes": {str(code): n for code, n in sorted(self.rejected_exit_codes.items())},
        }


@dataclass
class HostileFigures:
    classes_of: dict[str, str] = field(default_factory=dict)  # nodeid -> hostile class
    recorded: Counter[str] = field(default_factory=Counter)  # nodeid -> cases recorded by the test
    codes: dict[str, Counter[int]] = field(default_factory=dict)  # nodeid -> exit codes it recorded
    seen_codes: dict[str, Counter[int]] = field(default_factory=dict)  # nodeid -> non-zero codes run_cli saw
    outcome_of: dict[str, str] = field(default_factory=dict)  # nodeid -> passed/failed/skipped

    def add_cases(self, nodeid: str, cls: str, n: int, rejected_codes: Iterable[int]) -> None:
        self.classes_of.setdefault(nodeid, cls)
        self.recorded[nodeid] += n
        codes = [int(code) for code in rejected_codes]
        if codes:
            self.codes.setdefault(nodeid, Counter()).update(codes)

    def note_outcome(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.classes_of:
            return
        if report.when == "call" or report.outcome != "passed":  # a setup error or skip ends the test
            previous = self.outcome_of.get(report.nodeid)
            if previous != "failed":  # a teardown error after a pass still fails the test
                self.outcome_of[report.nodeid] = report.outcome

    def per_class(self) -> dict[str, ClassFigures]:
        figures = {cls: ClassFigures() for cls in HOSTILE_CLASSES}
        for nodeid, cls in self.classes_of.items():
            outcome = self.outcome_of.get(nodeid)
            if outcome is None:
                continue  # collected but deselected or not reached
            figures[cls].outcomes[outcome] += 1
            if outcome != "skipped":
                figures[cls].cases[outcome] += self.recorded.get(nodeid) or 1  # a plain test is one case
            # A test that records its codes knows which were refusals; else what run_cli saw.
            figures[cls].rejected_exit_codes.update(self.codes.get(nodeid) or self.seen_codes.get(nodeid, Counter()))
        return figures


# -- the plugin -----------------------------------------------------------------------


class FiguresPlugin:
    """Owns the registry for one session; conftest's helpers reach it through `current()`."""

    def __init__(self) -> None:
        self.leaks = LeakRegistry()
        self.hostile = HostileFigures()
        self.nodeid = ""  # the test running now, for record_cases
        self.hunted: list[Leak] | None = None  # set once the final test has searched
        self.search_seconds = 0.0  # the session-end search's cost, one needle at a time
        self.leftovers: dict[str, list[str]] = {}  # what the session's services still held at their end
        self.case_figures: dict[str, dict[str, dict[str, Any]]] = {}  # group -> case -> measured values

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            marker = item.get_closest_marker("hostile")
            if marker is not None:
                self.hostile.classes_of[item.nodeid] = hostile_class(marker, item.nodeid)
        # The session's leak hunt searches what every other test recorded, so it runs last.
        last = [item for item in items if item.get_closest_marker("leak_hunt_last")]
        items[:] = [item for item in items if item not in last] + last

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        self.nodeid = item.nodeid
        try:
            return (yield)
        finally:
            self.nodeid = ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.hostile.note_outcome(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        started = time.monotonic()
        leaks = find_leaks(self.leaks.values, self.leaks.texts)  # again: teardowns record too
        self.search_seconds = round(time.monotonic() - started, 3)
        directory = Path(os.environ.get("SITEST_FIGURES_DIR") or FIGURES_DIR)
        directory.mkdir(exist_ok=True)
        (directory / ".gitignore").write_text("*\n")  # figures of one run, never committed
        write_json(directory / "leak-hunt.json", self.leak_figures(leaks))
        write_json(directory / "hostile.json", self.hostile_figures())
        write_json(directory / "cases.json", self.case_figures)
        write_json(directory / "leftovers.json", {k: {"count": len(v), "names": v} for k, v in self.leftovers.items()})
        left = {kind: names for kind, names in self.leftovers.items() if names}
        if left:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"LEFT BEHIND at the end of the session: {left}", red=True, bold=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        new = [leak for leak in leaks if leak not in (self.hunted or [])]
        if new:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            lines = ["LEAK HUNT: secret values found in outputs:", *(f"  {leak}" for leak in new)]
            if reporter is not None:
                reporter.write_line("\n".join(lines), red=True, bold=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def leak_figures(self, leaks: list[Leak]) -> dict[str, Any]:
        texts = self.leaks.texts
        return {
            "values_collected": len(self.leaks.values),
            "values_by_source": dict(Counter(_source_kind(s) for s in self.leaks.values.values())),
            "values_too_short_to_search": self.leaks.too_short,
            "needles_searched": sum(len(encodings(v)) for v in self.leaks.values),
            "texts_searched": len(texts),
            "texts_by_kind": dict(Counter(label.split(":", 1)[0] for label, _ in texts)),
            "bytes_searched": sum(len(text.encode(errors="replace")) for _, text in texts),
            "leaks_found": len(leaks),
            "search_seconds": self.search_seconds,
            "leaks": [str(leak) for leak in leaks],
        }

    def hostile_figures(self) -> dict[str, Any]:
        return {cls: figures.as_json() for cls, figures in self.hostile.per_class().items()}


def _source_kind(source: str) -> str:
    return source.split(":", 1)[0]


def hostile_class(marker: pytest.Mark, nodeid: str) -> str:
    cls = marker.args[0] if marker.args else marker.kwargs.get("cls")
    if cls not in HOSTILE_CLASSES:
        raise pytest.UsageError(f"{nodeid}: @pytest.mark.hostile({cls!r}): the class is one of {HOSTILE_CLASSES}")
    return str(cls)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- the session's plugin, and the helpers tests call ------------------------------------------

_PLUGIN_NAME = "secret-init-figures"


def install(config: pytest.Config) -> None:
    """Register the plugin and the markers (pyproject has --strict-markers)."""
    config.addinivalue_line("markers", f"hostile(cls): a hostile case of one class: {', '.join(HOSTILE_CLASSES)}")
    config.addinivalue_line("markers", "leak_hunt_last: runs after every other test (the session's leak hunt)")
    if config.pluginmanager.get_plugin(_PLUGIN_NAME) is None:
        plugin = FiguresPlugin()
        config.pluginmanager.register(plugin, _PLUGIN_NAME)
        _session[:] = [plugin]


def current() -> FiguresPlugin | None:
    """The running session's plugin; None outside pytest (a helper imported by the bench)."""
    return _session[-1] if _session else None


_session: list[FiguresPlugin] = []  # filled by install(); helpers called outside pytest record nothing


def register_secret(value: str, source: str = "test") -> str:
    """Add `value` to the values the session's leak hunt looks for; returns it."""
    plugin = current()
    if plugin is not None and value:
        plugin.leaks.add_value(value, source)
    return value


def record_figure(group: str, case: str, **values: Any) -> None:
    """A measured outcome of one case (a fault, a storm, a huge answer) for .test-figures/cases.json."""
    plugin = current()
    if plugin is not None:
        plugin.case_figures.setdefault(group, {})[case] = values


def record_leftovers(kind: str, names: Iterable[str]) -> None:
    """What a session service still holds when it stops (live leases, usable database roles): must be none."""
    plugin = current()
    if plugin is not None:
        plugin.leftovers.setdefault(kind, []).extend(sorted(names))


def record_output(text: str | bytes, label: str = "output") -> None:
    """Add a text secret-init (or the app through it) produced to the texts the leak hunt searches."""
    plugin = current()
    if plugin is None:
        return
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    plugin.leaks.add_text(text, f"{label}: {plugin.nodeid or 'outside a test'}")


def record_cases(cls: str, n: int = 1, rejected_codes: Iterable[int] = ()) -> None:
    """Count `n` hostile inputs of class `cls` tried by the running test, and the exit codes of the refused ones."""
    if cls not in HOSTILE_CLASSES:
        raise ValueError(f"hostile class {cls!r} is not one of {HOSTILE_CLASSES}")
    plugin = current()
    if plugin is not None:
        plugin.hostile.add_cases(plugin.nodeid, cls, n, rejected_codes)


def note_exit_code(code: int) -> None:
    """An exit code secret-init gave the running test; a refusal (non-zero) counts for a hostile test."""
    plugin = current()
    if plugin is not None and code != 0 and plugin.nodeid in plugin.hostile.classes_of:
        plugin.hostile.seen_codes.setdefault(plugin.nodeid, Counter())[code] += 1


def record_process(pid: int, label: str = "process", environ: bool = True) -> None:
    """Record /proc/PID/cmdline (and environ) of a live process, e.g. the app secret-init started.

    environ=False for secret-init itself when the test handed it a token in its environment:
    that is the test's input, not something secret-init wrote.
    """
    names = ("cmdline", "environ") if environ else ("cmdline",)
    for name in names:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                record_output(f.read().replace(b"\0", b"\n"), f"/proc/{name}")
        except OSError:
            pass  # it ended first: nothing left to leak there


def harvest_output_dir(directory: Path) -> None:
    """Register the credentials secret-init wrote under `directory`; record its `.secret-init/` files.

    Only files whose names look like credentials (or such fields of a JSON file) are registered:
    a user name is not a secret, and the apps print theirs.
    """
    for root, _dirs, files in os.walk(directory):  # does not follow symlinks
        for name in files:
            path = os.path.join(root, name)
            content = _read_regular_file(path)
            if content is None:
                continue
            if os.path.basename(root) == STATE_DIR:  # secret-init's own state, readable by the app's group
                record_output(content, "status.json" if name == "status.json" else f"{STATE_DIR}/{name}")
                continue
            if any(hint in name.lower() for hint in SECRET_NAME_HINTS):
                register_secret(content, f"output file:{name}")
            _register_secret_fields(content, name)


def _read_regular_file(path: str) -> str | None:
    """The text of a regular file; None for anything else a hostile test left (a FIFO, a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block the teardown
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_HARVEST_BYTES:
            return None
        try:
            return f.read().decode(errors="replace")
        except OSError:
            return None


def _register_secret_fields(content: str, name: str) -> None:
    try:
        document = json.loads(content)
    except ValueError:
        return
    if not isinstance(document, dict):
        return
    for key, value in document.items():
        if isinstance(value, str) and any(hint in str(key).lower() for hint in SECRET_NAME_HINTS):
            register_secret(value, f"output file:{name}.{key}")


class DockerCli(Protocol):
    def docker(self, *args: str, check: bool = True) -> "subprocess.CompletedProcess[str]": ...


def record_image_histories(engine: DockerCli) -> None:
    """`docker history --no-trunc` and the config of every image on a test engine, before it goes away.

    Build arguments and ENV lines stay in an image for anyone who pulls it.
    """
    listed = engine.docker("image", "ls", "--quiet", "--no-trunc", check=False)
    for image_id in sorted(set(listed.stdout.split())):
        history = engine.docker("history", "--no-trunc", image_id, check=False)
        record_output(history.stdout + history.stderr, f"docker history {image_id[:19]}")
        inspected = engine.docker("image", "inspect", image_id, check=False)
        record_output(inspected.stdout, f"docker image inspect {image_id[:19]}")
