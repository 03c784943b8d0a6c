"""Progress of the long compile stages, reported through a factory the caller passes (or not).

A progress factory is called as tqdm is, `factory(iterable, desc=..., total=..., unit=...)`, and
returns an iterable that yields the same items in the same order (a bar advancing as they are
consumed); `edgemoe-compile` passes one that draws tqdm bars on stderr. None (the default
everywhere) reports nothing. Reporting never changes what is computed: the stages iterate over
exactly what they did without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
Progress = Optional[Callable[..., Iterable]]


def track(progress: Progress, iterable: Iterable[T], desc: str, total: int | None = None,
          unit: str = "it") -> Iterable[T]:
    """`iterable`, counted on a bar named `desc` where there is a progress factory."""
    if progress is None:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return progress(iterable, desc=desc, total=total, unit=unit)


@contextmanager
def stage(progress: Progress, desc: str) -> Iterator[None]:
    """A stage that is one long call (importing, tvm.compile, linking): a bar of one step that
    completes when the block does (and stays incomplete where the block raises)."""
    if progress is None:
        yield
        return
    steps = iter(progress([desc], desc=desc, total=1, unit="stage"))
    try:
        next(steps, None)  # the bar is drawn at 0/1
        yield
        for _ in steps:  # the block is done: 1/1
            pass
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()


def tuning_jobs(progress: Progress) -> Progress:
    """The one-argument wrapper compiler.tuning.tune takes, on a bar of its own."""
    if progress is None:
        return None
    return lambda jobs: track(progress, jobs, "tuning kernels", unit="run")
