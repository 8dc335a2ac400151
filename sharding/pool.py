"""Worker processes fed by the main thread over pipes, giving results back in task order.

multiprocessing.Pool hands every task and result through three helper threads in the main process;
on a 2-core machine their wake-ups cost more CPU than the rest of the main process's work. Here the
main thread talks to each worker over its own pipe, with a couple of tasks queued per worker so that
none waits for the main process, and a bounded window so results cannot pile up in memory.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

_QUEUED_PER_WORKER = 2


def _receive(conn, tasks: queue.SimpleQueue) -> None:
    """Take tasks off the pipe as they come, so that the main process never blocks sending one while
    this worker blocks sending a large result (each waiting for the other: a deadlock)."""
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            task = None
        tasks.put(task)
        if task is None:
            return


def _serve(conn, initializer: Callable, initargs: tuple) -> None:
    """A worker: run (tag, fn, arg) tasks until told to stop; send back (tag, ok, result or error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    initializer(*initargs)
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(conn, tasks), daemon=True).start()
    while (task := tasks.get()) is not None:
        tag, fn, arg = task
        try:
            reply = (tag, True, fn(arg))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main process
            reply = (tag, False, e)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return  # the main process is gone
        except Exception as e:  # noqa: BLE001 - an exception that does not pickle
            conn.send((tag, False, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({e})")))


class WorkerPool:
    """`workers` processes started with `initializer(*initargs)`; `map` runs a function over items."""

    def __init__(self, workers: int, initializer: Callable, initargs: tuple, method: str = "fork"):
        ctx = multiprocessing.get_context(method)
        self._conns, self._procs = [], []
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, initializer, initargs), daemon=True)
            proc.start()
            theirs.close()  # so that a worker's death reads as end-of-file here
            self._conns.append(mine)
            self._procs.append(proc)
        self._maps = 0  # tags replies, so that those of a map left early are not taken for another's

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """fn(item) for every item, computed in the workers, yielded in the order of `items`."""
        todo = iter(items)
        self._maps += 1
        this = self._maps
        window = len(self._conns) * (_QUEUED_PER_WORKER + 2)
        queued = {conn: 0 for conn in self._conns}
        done: dict[int, object] = {}
        sent = yielded = 0
        exhausted = False
        while True:
            while not exhausted and sent < yielded + window:
                conn = min(self._conns, key=queued.__getitem__)
                if queued[conn] >= _QUEUED_PER_WORKER:
                    break
                item = next(todo, _END)
                if item is _END:
                    exhausted = True
                    break
                try:
                    conn.send(((this, sent), fn, item))
                except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
                    raise _died() from None
                queued[conn] += 1
                sent += 1
            if yielded in done:
                ok, result = done.pop(yielded)
                if not ok:
                    raise result
                yield result
                yielded += 1
                continue
            if exhausted and yielded == sent:
                return
            for conn in wait([c for c in self._conns if queued[c]]):
                try:
                    (which, index), ok, result = conn.recv()
                except (EOFError, OSError):
                    raise _died() from None
                if which != this:
                    continue
                queued[conn] -= 1
                done[index] = (ok, result)  # an error is raised in its turn, as map() would

    def close(self) -> None:
        """Stop the workers; tasks still queued are abandoned."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(5)
        for conn in self._conns:
            conn.close()


_END = object()


def _died() -> RuntimeError:
    return RuntimeError("a worker process died (out of memory, or killed?): rerun the same command to resume")
