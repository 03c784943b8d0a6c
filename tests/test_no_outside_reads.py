"""The guard that fails tests opening files beside the checkout (tests/_no_outside_reads.py)."""
import os
import uuid
from types import SimpleNamespace

import pytest

import _no_outside_reads as guard_mod
from _no_outside_reads import GUARD_KEY, Guard, Plugin, outside_path, outside_repo


@pytest.fixture
def layout(tmp_path):
    """parent/{repo, shared/data/x.txt, .cache/x, allowed/x}, with a link repo/data -> ../shared/data."""
    parent = tmp_path / "parent"
    repo = parent / "repo"
    for d in (repo, parent / "shared" / "data", parent / ".cache", parent / "allowed"):
        d.mkdir(parents=True)
    for f in (parent / "shared" / "data" / "x.txt", parent / ".cache" / "x", parent / "allowed" / "x",
              repo / "inside.txt"):
        f.write_text("x")
    (repo / "data").symlink_to(parent / "shared" / "data")
    return SimpleNamespace(parent=parent, repo=repo, shared=parent / "shared" / "data" / "x.txt")


def test_path_rules(layout, monkeypatch):
    repo, parent = layout.repo, layout.parent
    assert outside_repo(layout.shared, repo)
    assert outside_repo(str(repo / ".." / "shared" / "data" / "x.txt"), repo)
    assert outside_repo(os.fsencode(layout.shared), repo)                # bytes paths too
    assert outside_repo(parent / "missing.txt", repo)                     # a failed open still counts
    assert outside_repo(repo / "data" / "x.txt", repo)                    # symlink out of the repo
    assert outside_path(repo / "data" / "x.txt", repo) == str(layout.shared.resolve())
    assert not outside_repo(repo / "inside.txt", repo)
    assert not outside_repo(repo, repo)
    assert not outside_repo(parent, repo)                                 # the parent folder itself
    assert not outside_repo(parent / ".cache" / "x", repo)                # hidden folders: tool caches
    assert not outside_repo(parent / "allowed" / "x", repo, [str(parent / "allowed")])
    assert outside_repo(parent / "allowed2" / "x", repo, [str(parent / "allowed")])  # a prefix, not a folder
    assert not outside_repo(parent.parent / "elsewhere.txt", repo)        # above the parent: not beside
    monkeypatch.chdir(repo)
    assert outside_repo("../shared/data/x.txt", repo)                     # relative to the current folder
    assert not outside_repo("inside.txt", repo)
    assert not outside_repo("/", "/")                                     # a root repo has no parent


def test_audited_open_is_recorded_and_fails_the_phase(layout):
    g = guard_mod.activate(Guard(layout.repo))
    try:
        (layout.repo / "inside.txt").read_text()
        assert g.seen == []
        plugin = Plugin(g)
        phase = plugin._phase(SimpleNamespace(nodeid="t::x"))
        next(phase)                                                       # the test phase starts
        with open(layout.repo / "data" / "x.txt") as f:                  # a real open, via the symlink
            f.read()
        os.close(os.open(layout.shared, os.O_RDONLY))                     # os.open is audited too
        with pytest.raises(pytest.fail.Exception, match="shared/data/x.txt"):
            phase.send(None)                                              # ... and ends: it fails
        assert g.seen == [(str(layout.shared.resolve()), "t::x")] * 2
    finally:
        guard_mod.deactivate(g)
    with open(layout.shared) as f:                                        # inactive: not recorded
        f.read()
    assert len(g.seen) == 2


def test_session_guard_watches_the_real_parent(request):
    """The guard this session runs under sees an open beside the real checkout (a file that does not
    exist, so nothing is created or left behind)."""
    g = request.config.stash[GUARD_KEY]
    probe = guard_mod.REPO.parent / f"edgemoe-guard-probe-{uuid.uuid4().hex}.txt"
    assert not probe.exists()
    if not outside_repo(probe, g.repo, g.exempt):
        pytest.skip(f"the checkout's parent {guard_mod.REPO.parent} is a root or an exempt folder")
    before = list(g.seen)
    with g.expect_outside() as got:
        with pytest.raises(FileNotFoundError):
            open(probe)
    assert got == [os.path.realpath(probe)]
    assert g.seen == before and not probe.exists()
