"""Where the tasks run: Dask (a local cluster of worker processes, or an existing scheduler), or this
process for `nudges replay export/`. Both answer the same `map`: results as tasks finish, each with the
position of its input, so progress can be shown and the caller never depends on completion order.

Dask and not a pool of our own: the same command then runs on a laptop, on HPC (dask-jobqueue) or on
Kubernetes (dask-kubernetes) by pointing `--scheduler` at the cluster, with Dask's retries of a task
whose worker died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from .tasks import ScreenError

# The local cluster's workers do not sample their own stacks: Dask's statistical profiler (every 10 ms, for
# the dashboard's profile page) took a few per cent of a screening's CPU. A cluster of the user's own
# keeps its settings (the README shows the same switch for one).
LOCAL_CONFIG = {"distributed.worker.profile.enabled": False}
RETRIES = 2  # a task whose worker died is run again; tasks overwrite their own outputs, so this is safe


class Runner(Protocol):
    workers: int

    def map(self, fn: Callable[..., Any], items: Sequence[Any], **kwargs: Any) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


class InProcess:
    """One task after another in this process: a single worker without a cluster."""

    workers = 1

    def map(self, fn: Callable[..., Any], items: Sequence[Any], **kwargs: Any) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item, **kwargs)

    def close(self) -> None:
        pass


class DaskRunner:
    """A Dask client: of a LocalCluster of `workers` processes (one thread each: the rules are Python and
    hold the GIL), or of the scheduler at `scheduler` (tcp://host:8786)."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None, scratch: Path | None = None) -> None:
        from distributed import Client, LocalCluster

        self.cluster: Any = None
        try:
            if scheduler:
                self.client = Client(scheduler, timeout="30s")
            else:
                import dask

                with dask.config.set(LOCAL_CONFIG):  # the nannies hand it to their workers
                    self.cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                                                dashboard_address=":0", silence_logs=logging.ERROR,
                                                local_directory=str(scratch) if scratch else None)
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as exc:
            if self.cluster is not None:
                self.cluster.close()
            where = f"the Dask scheduler at {scheduler}" if scheduler else "a local Dask cluster"
            raise ScreenError(f"could not reach {where} ({type(exc).__name__}: {exc})") from None
        self.workers = max(1, sum(self.client.nthreads().values()))

    def map(self, fn: Callable[..., Any], items: Sequence[Any], **kwargs: Any) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        futures = self.client.map(fn, list(items), pure=False, retries=RETRIES, **kwargs)
        position = {future.key: index for index, future in enumerate(futures)}
        try:
            for future in as_completed(futures):
                try:
                    value = future.result()
                except ScreenError:
                    raise
                except Exception as exc:  # a task's own exception, raised again here by Dask
                    raise ScreenError(f"a {getattr(fn, '__name__', 'task')} task failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
                yield position[future.key], value
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
