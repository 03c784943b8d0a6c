"""Test guard: the tests may not open files beside the repository (e.g. ``../shared``).

A user's clone has nothing next to it, so a test that passes only because a sibling folder of the
checkout exists on the developer's machine is a broken test. This plugin installs a
``sys.addaudithook`` hook on the ``open`` event (``open()``, ``io.open``, ``os.open``, and
everything built on them) and records every path whose resolved location lies under the
repository's parent folder but not under the repository itself. A test during whose setup, call
or teardown such a file is opened fails, naming the path; an open outside any test (collection,
imports) fails the session and is listed in the summary.

Not flagged, although under the parent: hidden folders directly under it (``~/.cache``,
``~/.local``, ``~/.pyenv`` when the clone sits in a home folder), the Python installation and its
site-packages, the temp folder, and folders the user named explicitly in ``$EDGEMOE_DATA_DIR``,
``$EDGEMOE_TEST_MODEL``, ``$EDGEMOE_CACHE_DIR`` or ``$EDGEMOE_ALLOW_OUTSIDE_READS``
(``os.pathsep``-separated).

Only this Python process is audited: files that subprocesses or the C runtime open are not seen.
"""
from __future__ import annotations

import contextlib
import os
import site
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_FOLDERS = ("EDGEMOE_DATA_DIR", "EDGEMOE_TEST_MODEL", "EDGEMOE_CACHE_DIR")
ENV_ALLOW = "EDGEMOE_ALLOW_OUTSIDE_READS"


def _under(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (both already resolved, absolute)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def default_exempt() -> list[str]:
    """Folders under the parent that are not the project's business (see the module docstring)."""
    folders = [sys.prefix, sys.base_prefix, sys.exec_prefix, tempfile.gettempdir(),
               *sysconfig.get_paths().values()]
    with contextlib.suppress(Exception):
        folders += site.getsitepackages()
    with contextlib.suppress(Exception):
        folders.append(site.getusersitepackages())
    folders += [os.environ[v] for v in ENV_FOLDERS if os.environ.get(v)]
    folders += [f for f in os.environ.get(ENV_ALLOW, "").split(os.pathsep) if f]
    return [os.path.realpath(f) for f in folders]


def outside_path(path, repo, exempt=()) -> str | None:
    """The resolved ``path`` when it lies under ``repo``'s parent folder but not under ``repo``, else None.

    Symlinks are followed (a link inside the repo to ``../shared`` counts as outside), relative
    paths are taken from the current folder. Not flagged: the parent folder itself, hidden folders
    directly under the parent, and anything under a folder of ``exempt`` (resolved paths)."""
    repo = os.path.realpath(repo)
    parent = os.path.dirname(repo)
    if parent == repo:  # the repo is a filesystem root: nothing lies beside it
        return None
    p = os.path.realpath(os.fsdecode(path))
    if not _under(p, parent) or p == parent or _under(p, repo):
        return None
    if os.path.relpath(p, parent).startswith("."):
        return None
    return None if any(_under(p, e) for e in exempt) else p


def outside_repo(path, repo, exempt=()) -> bool:
    """True when ``path`` is a file beside the repository (see :func:`outside_path`)."""
    return outside_path(path, repo, exempt) is not None


class Guard:
    """Records the outside-repo opens seen by the audit hook while it is active."""

    def __init__(self, repo, exempt=()):
        self.repo = os.path.realpath(repo)
        self.exempt = list(exempt)
        self.seen: list[tuple[str, str | None]] = []  # (resolved path, test id or None)
        self.test: str | None = None
        self._capture: list[list[str]] = []

    def check(self, path) -> None:
        p = outside_path(path, self.repo, self.exempt)
        if p is not None:
            if self._capture:
                self._capture[-1].append(p)
            else:
                self.seen.append((p, self.test))

    @contextlib.contextmanager
    def expect_outside(self):
        """Collect outside opens in the yielded list instead of reporting them (for tests of the guard)."""
        got: list[str] = []
        self._capture.append(got)
        try:
            yield got
        finally:
            self._capture.remove(got)


_guards: list[Guard] = []
_busy = threading.local()


def _audit(event, args):
    if event != "open" or not _guards or getattr(_busy, "on", False):
        return
    path = args[0] if args else None
    if path is None or isinstance(path, int):
        return
    _busy.on = True
    try:
        for g in list(_guards):
            g.check(path)
    except Exception:  # an audit hook must never break the open it watches
        pass
    finally:
        _busy.on = False


_installed = False


def activate(guard: Guard) -> Guard:
    """Start auditing for ``guard`` (the process-wide hook is added once and cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True
    _guards.append(guard)
    return guard


def deactivate(guard: Guard) -> None:
    if guard in _guards:
        _guards.remove(guard)


class Plugin:
    """pytest side: fail the test phase during which an outside file was opened."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def _phase(self, item):
        self.guard.test = item.nodeid
        start = len(self.guard.seen)
        try:
            result = yield
        finally:
            self.guard.test = None
        new = sorted({p for p, _ in self.guard.seen[start:]})
        if new:
            pytest.fail(f"opened files outside the repository {self.guard.repo} (a user's clone has "
                        f"no such files): " + ", ".join(new), pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        return (yield from self._phase(item))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        return (yield from self._phase(item))

    def pytest_unconfigure(self, config):
        deactivate(self.guard)

    def pytest_sessionfinish(self, session):
        if self.guard.seen and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.guard.seen:
            return
        terminalreporter.section("files opened outside the repository")
        terminalreporter.line("a user's clone has none of these: the session fails")
        for p, test in sorted(set(self.guard.seen), key=lambda s: (s[0], s[1] or "")):
            terminalreporter.line(f"{p}  ({test or 'outside any test: collection or import'})")


def register(config) -> Guard:
    """Activate the guard for the repository and register its pytest hooks (from conftest)."""
    guard = activate(Guard(REPO, default_exempt()))
    config.pluginmanager.register(Plugin(guard), "edgemoe-no-outside-reads")
    config.stash[GUARD_KEY] = guard
    return guard


GUARD_KEY = pytest.StashKey[Guard]()
