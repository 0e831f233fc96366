"""The typed batch and the data plane it travels on.

A :class:`Batch` holds rows as columns of numpy arrays with a declared type per column
(:data:`COLUMNS`): ``dense`` (one value per row), ``ragged`` (a variable-length run per
row: flat values plus offsets, optionally with rows marked missing) and ``text`` (UTF-8
bytes, ragged). Ray stores numpy arrays in its object store without copying them again
on read, and a batch's size is its arrays' size.

A :class:`Rows` is a handle to rows that live elsewhere: pieces (an object reference, or
in process the batch itself, with its row count), an optional fixed shuffle and a range
of positions. Groups split a ``Rows`` over their ranks (:mod:`rayalign.cluster.group`);
each rank fetches only the pieces its rows are in. The driver passes handles and reads
small metadata, so what crosses it per PPO iteration does not grow with the batch
(``benchmarks/driver_bytes.py``). :func:`task` runs a function off the driver on
handles (in the session's data-plane worker where the rows are in the object store, in
process otherwise).
"""
from __future__ import annotations

import collections
import dataclasses
import pickle
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import RayalignError


class BatchError(RayalignError, ValueError):
    """A batch whose columns do not match the declared schema, or rows that do not line up."""


@dataclass(frozen=True)
class Column:
    kind: str            # dense | ragged | text
    dtype: str           # numpy dtype of the values
    nullable: bool = False


# Every column a batch may hold, with its type: a misspelt or mistyped column is an error
# where the batch is built, not a KeyError on another node later.
COLUMNS: dict[str, Column] = {
    "prompt": Column("text", "uint8"),
    "response": Column("text", "uint8"),
    "prompt_ids": Column("ragged", "int32"),
    "response_ids": Column("ragged", "int32"),
    "ended": Column("dense", "bool"),
    "weight_version": Column("dense", "int64"),
    "rollout_logprobs": Column("ragged", "float32", nullable=True),
    "logprobs": Column("ragged", "float32"),
    "values": Column("ragged", "float32"),
    "score": Column("dense", "float32"),
    "old_logprobs": Column("ragged", "float32"),
    "old_values": Column("ragged", "float32"),
    "advantages": Column("ragged", "float32"),
    "returns": Column("ragged", "float32"),
    "is_weights": Column("ragged", "float32"),
    "ref_logprobs": Column("ragged", "float32"),  # GRPO: the KL is a loss term
}


def _spec(name: str) -> Column:
    try:
        return COLUMNS[name]
    except KeyError:
        raise BatchError(f"batch column {name!r} is not declared (rayalign.batch.COLUMNS has "
                         f"{sorted(COLUMNS)})") from None


@dataclass
class Ragged:
    """Variable-length runs: row i is ``values[offsets[i]:offsets[i+1]]``; ``valid`` marks
    rows that hold a value at all (None: every row does)."""
    values: np.ndarray
    offsets: np.ndarray
    valid: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes + (self.valid.nbytes if self.valid is not None else 0)

    @classmethod
    def of(cls, rows: Sequence, dtype: str, nullable: bool = False) -> "Ragged":
        valid = np.array([r is not None for r in rows], dtype=bool)
        if not nullable and not valid.all():
            raise BatchError("a row is None in a column that is not nullable")
        lens = np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        parts = [np.asarray(r, dtype=dtype) for r in rows if r is not None and len(r)]
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        return cls(values, offsets, None if valid.all() else valid)

    def take(self, idx: np.ndarray) -> "Ragged":
        lens = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if len(idx) and lens.sum():
            pos = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
            values = self.values[pos]
        else:
            values = self.values[:0]
        return Ragged(values, offsets, None if self.valid is None else self.valid[idx])

    @staticmethod
    def concat(parts: Sequence["Ragged"]) -> "Ragged":
        shift = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        valid = None
        if any(p.valid is not None for p in parts):
            valid = np.concatenate([p.valid if p.valid is not None else np.ones(len(p), bool) for p in parts])
        return Ragged(np.concatenate([p.values for p in parts]), offsets, valid)


class Batch:
    """Rows as typed columns (see :data:`COLUMNS`)."""

    def __init__(self, columns: dict[str, Any]):
        n = None
        self.columns: dict[str, Any] = {}
        for name, col in columns.items():
            spec = _spec(name)
            if spec.kind == "dense":
                if not isinstance(col, np.ndarray) or col.ndim != 1:
                    raise BatchError(f"batch column {name!r} is dense: a 1-D array, not {type(col).__name__}")
            elif not isinstance(col, Ragged):
                raise BatchError(f"batch column {name!r} is {spec.kind}: a Ragged, not {type(col).__name__}")
            arr = col if spec.kind == "dense" else col.values
            if arr.dtype != np.dtype(spec.dtype):
                raise BatchError(f"batch column {name!r} holds {arr.dtype}, declared {spec.dtype}")
            if spec.kind != "dense" and col.valid is not None and not spec.nullable:
                raise BatchError(f"batch column {name!r} is not nullable")
            if n is not None and len(col) != n:
                raise BatchError(f"batch column {name!r} has {len(col)} rows, the others {n}")
            n = len(col)
            self.columns[name] = col
        self.n = n or 0

    def __len__(self) -> int:
        return self.n

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.columns.values())

    def complete(self, name: str) -> bool:
        """Whether every row has a value in column ``name``."""
        c = self.columns.get(name)
        return c is not None and (not isinstance(c, Ragged) or c.valid is None)

    @classmethod
    def from_rows(cls, rows: Sequence[dict], names: Iterable[str] | None = None) -> "Batch":
        """Rows given as dicts (lists of ints or floats, strings, bools); ``names`` picks the
        keys (default: every key of the first row)."""
        if not rows:
            raise BatchError("a batch needs at least one row")
        names = list(names if names is not None else rows[0].keys())
        return cls({name: column(name, [r.get(name) for r in rows]) for name in names})

    def to_rows(self, names: Iterable[str] | None = None) -> list[dict]:
        """The rows as dicts of Python values (what a worker's per-sample code reads)."""
        names = list(names if names is not None else self.columns)
        cols = {k: _python(k, self.columns[k]) for k in names}
        return [{k: v[i] for k, v in cols.items()} for i in range(self.n)]

    def get(self, name: str) -> list:
        return _python(name, self.columns[name])

    def take(self, idx: np.ndarray) -> "Batch":
        idx = np.asarray(idx, dtype=np.int64)
        return Batch({k: c[idx] if isinstance(c, np.ndarray) else c.take(idx) for k, c in self.columns.items()})

    def with_columns(self, other: "Batch | dict") -> "Batch":
        """This batch's columns and ``other``'s, row for row (``other`` wins on a name)."""
        other = other if isinstance(other, Batch) else Batch(other)
        if len(other) != self.n:
            raise BatchError(f"cannot join {len(other)} rows onto {self.n}")
        return Batch({**self.columns, **other.columns})

    @staticmethod
    def concat(parts: Sequence["Batch"]) -> "Batch":
        if len(parts) == 1:
            return parts[0]
        names = list(parts[0].columns)
        for p in parts[1:]:
            if list(p.columns) != names:
                raise BatchError(f"cannot concatenate batches with columns {names} and {list(p.columns)}")
        return Batch({k: np.concatenate([p.columns[k] for p in parts]) if isinstance(parts[0].columns[k], np.ndarray)
                      else Ragged.concat([p.columns[k] for p in parts]) for k in names})


def column(name: str, values: Sequence) -> Any:
    """One declared column from Python values."""
    spec = _spec(name)
    if spec.kind == "dense":
        if any(v is None for v in values):
            raise BatchError(f"batch column {name!r}: a row has no value")
        return np.asarray(values, dtype=spec.dtype)
    if spec.kind == "text":
        return Ragged.of([np.frombuffer(str(v).encode("utf-8"), dtype=np.uint8) for v in values], "uint8")
    try:
        return Ragged.of([None if v is None else np.asarray(v, dtype=spec.dtype).reshape(-1) for v in values],
                         spec.dtype, spec.nullable)
    except BatchError as e:
        raise BatchError(f"batch column {name!r}: {e}") from None


def _python(name: str, col: Any) -> list:
    spec = COLUMNS[name]
    if spec.kind == "dense":
        return col.tolist()
    if spec.kind == "text":
        return [col.row(i).tobytes().decode("utf-8") for i in range(len(col))]
    flat, off = col.values.tolist(), col.offsets.tolist()
    out = [flat[off[i]:off[i + 1]] for i in range(len(col))]
    if col.valid is not None:
        out = [v if ok else None for v, ok in zip(out, col.valid.tolist())]
    return out


def frame(col: Ragged, width: int | None = None):
    """A ragged float column as a right-padded ``[B, W]`` torch frame and its mask."""
    import torch

    lens = col.lengths
    w = int(width if width is not None else (lens.max() if len(lens) else 0))
    t = torch.zeros((len(col), w), dtype=torch.float32)
    m = torch.zeros((len(col), w), dtype=torch.float32)
    for i in range(len(col)):
        n = int(lens[i])
        t[i, :n] = torch.tensor(col.row(i), dtype=torch.float32)
        m[i, :n] = 1
    return t, m


def unframe(t, lengths: Sequence[int]) -> Ragged:
    """Inverse of :func:`frame` for float rows."""
    arr = t.detach().to("cpu").float().numpy()
    return Ragged.of([arr[i, :int(n)] for i, n in enumerate(lengths)], "float32")


# ---------------------------------------------------------------- the data plane


def _is_ref(x: Any) -> bool:
    try:
        import ray

        return isinstance(x, ray.ObjectRef)
    except ImportError:
        return False


def split_sizes(total: int, n: int) -> list[int]:
    """Sizes of ``n`` contiguous parts of ``total`` items, differing by at most one
    (earlier parts larger): how a split call shares items or rows over ranks."""
    q, r = divmod(total, n)
    return [q + (1 if i < r else 0) for i in range(n)]


def shuffle_order(n: int, seed: int) -> np.ndarray:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return np.asarray(order, dtype=np.int64)


@dataclass(frozen=True)
class Rows:
    """A handle to rows held elsewhere: ``pieces`` are (object reference or batch, rows),
    in order; ``order`` a shuffle seed (None: in order); positions ``start:stop`` of that
    order. Small whatever the rows' size."""
    pieces: tuple
    order: int | None = None
    start: int = 0
    stop: int | None = None
    complete: tuple = ()  # columns every row has a value in (from the producers' metas)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.pieces)

    def __len__(self) -> int:
        return (self.total if self.stop is None else self.stop) - self.start

    @property
    def remote(self) -> bool:
        return any(_is_ref(p) for p, _ in self.pieces)

    def take(self, start: int, stop: int) -> "Rows":
        if not 0 <= start <= stop <= len(self):
            raise BatchError(f"rows {start}:{stop} out of {len(self)}")
        return dataclasses.replace(self, start=self.start + start, stop=self.start + stop)

    def shuffled(self, seed: int) -> "Rows":
        if self.order is not None or self.start or self.stop not in (None, self.total):
            raise BatchError("only a whole, unshuffled set of rows can be shuffled")
        return dataclasses.replace(self, order=seed, start=0, stop=None)

    def split(self, n: int) -> list["Rows"]:
        """Contiguous parts whose sizes differ by at most one (earlier parts larger)."""
        out, at = [], 0
        for k in split_sizes(len(self), n):
            out.append(self.take(at, at + k))
            at += k
        return out

    def indices(self) -> np.ndarray:
        stop = self.total if self.stop is None else self.stop
        if self.order is None:
            return np.arange(self.start, stop, dtype=np.int64)
        return shuffle_order(self.total, self.order)[self.start:stop]

    def load(self) -> Batch:
        """The rows, fetching only the pieces they are in."""
        idx = self.indices()
        bounds = np.cumsum([0] + [n for _, n in self.pieces])
        need = [i for i in range(len(self.pieces))
                if len(idx) and ((idx >= bounds[i]) & (idx < bounds[i + 1])).any()]
        if not need:
            raise BatchError("an empty set of rows has nothing to load")
        parts = [_fetch(self.pieces[i][0]) for i in need]
        for i, b in zip(need, parts):
            if len(b) != self.pieces[i][1]:
                raise BatchError(f"a piece holds {len(b)} rows, its handle says {self.pieces[i][1]}")
        batch = Batch.concat(parts)
        # Positions within the fetched pieces.
        local = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in need])
        where = np.full(int(bounds[-1]), -1, dtype=np.int64)
        where[local] = np.arange(len(local))
        sel = where[idx]
        if len(sel) == len(batch) and (sel == np.arange(len(batch))).all():
            return batch
        return batch.take(sel)


# A rank reads the same piece once per minibatch and epoch: keep the last few.
_CACHE: "collections.OrderedDict[str, Batch]" = collections.OrderedDict()
_CACHE_SIZE = 8


_CACHE_LOCK = threading.Lock()


def _fetch(piece: Any) -> Batch:
    if isinstance(piece, Batch):
        return piece
    if not _is_ref(piece):
        raise BatchError(f"a Rows piece is a {type(piece).__name__}, not an object reference or a Batch")
    import ray

    key = piece.hex()
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    b = ray.get(piece)
    if not isinstance(b, Batch):
        raise BatchError(f"object {key[:16]} holds a {type(b).__name__}, not a Batch")
    with _CACHE_LOCK:
        _CACHE[key] = b
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return b


def put(batch: Batch, remote: bool) -> Rows:
    """Rows over ``batch``: in the object store (``remote``) or held in process."""
    if remote:
        import ray

        ref = ray.put(batch)
        TRAFFIC.sent(batch)
        return Rows(((ref, len(batch)),), complete=_complete(batch))
    return Rows(((batch, len(batch)),), complete=_complete(batch))


def _complete(batch: Batch) -> tuple:
    return tuple(k for k in batch.columns if batch.complete(k))


def meta_of(batch: Batch, **extra) -> dict:
    return {"rows": len(batch), "nbytes": batch.nbytes, "columns": list(batch.columns),
            "complete": list(_complete(batch)), **extra}


def task(fn: Callable[..., tuple[dict, Batch]], *args, remote: bool | None = None, timeout_s: float | None = 600,
         **kwargs) -> tuple[dict, Rows]:
    """Run ``fn(*args) -> (meta, batch)`` off the driver when its rows are in the object
    store (in the session's data-plane worker, :class:`_PlaneWorker`); returns the small
    ``meta`` and the batch as :class:`Rows`."""
    if remote is None:
        remote = any(isinstance(a, Rows) and a.remote for a in args)
    if not remote:
        meta, batch = fn(*args, **kwargs)
        return meta, Rows(((batch, len(batch)),), complete=tuple(meta["complete"]))
    import ray

    _ship_by_value(fn, *args, *kwargs.values())
    TRAFFIC.sent((args, kwargs))
    meta_ref, batch_ref = _plane().run.options(num_returns=2).remote(fn, args, kwargs)
    try:
        meta = ray.get(meta_ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise BatchError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout_s:g}s") from None
    except ray.exceptions.RayActorError:
        _PLANE.clear()  # the next call starts a new one
        raise
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None
    TRAFFIC.received(meta)
    return meta, Rows(((batch_ref, meta["rows"]),), complete=tuple(meta["complete"]))


class _PlaneWorker:
    """Where the driver's data-plane functions run: one process per Ray session that
    takes no CPU of the placement groups (its work is small and waits on the roles'),
    kept alive so each call does not start and import a new worker (a plain task did:
    ~4 s a call, since Ray retires idle task workers after a second)."""

    def run(self, fn, args, kwargs):
        return fn(*args, **kwargs)


_PLANE: dict = {}


def _plane():
    import ray

    try:
        session = ray._private.worker.global_worker.node.session_name
    except AttributeError:
        session = None
    if _PLANE.get("session") != session or "actor" not in _PLANE:
        _PLANE.clear()
        _PLANE.update(session=session, actor=ray.remote(num_cpus=0, max_concurrency=4, max_restarts=0)(
            _PlaneWorker).options(name=None).remote())
    return _PLANE["actor"]


def _ship_by_value(*objs: Any) -> None:
    """Functions from the caller's own modules (a reward in a script or a test file) go to
    the task by value: the task's process may not be able to import those modules."""
    import sys
    import types

    from ray import cloudpickle

    todo, seen = list(objs), set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        # A reward mix's terms are closures over the functions that need shipping.
        todo += [t[-1] for t in getattr(obj, "terms", None) or [] if isinstance(t, tuple)]
        if isinstance(obj, types.FunctionType):
            todo += [c.cell_contents for c in obj.__closure__ or () if _cell_set(c)]
            mod = sys.modules.get(obj.__module__)
            if mod is not None and not obj.__module__.startswith(("rayalign", "__main__")) \
                    and "site-packages" not in (getattr(mod, "__file__", None) or "site-packages"):
                cloudpickle.register_pickle_by_value(mod)


def _cell_set(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- driver traffic


def sizeof(obj: Any) -> int:
    """Bytes of a value as it crosses a process boundary: object references count as
    their 28-byte ids, arrays and tensors as their data, handles and other objects as
    their pickle."""
    if _is_ref(obj):
        return 28
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode("utf-8", "replace"))
    if isinstance(obj, (bool, int, float)) or obj is None:
        return 8
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, Batch):
        return obj.nbytes
    if isinstance(obj, Rows):
        return sum(sizeof(p) + 8 for p, _ in obj.pieces) + 24
    if isinstance(obj, dict):
        return sum(sizeof(k) + sizeof(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(sizeof(x) for x in obj) + 8
    try:
        import torch

        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
    except ImportError:
        pass
    try:
        return len(pickle.dumps(obj))
    except Exception:
        try:
            from ray import cloudpickle

            return len(cloudpickle.dumps(obj))
        except Exception:
            return 0


@dataclass
class Traffic:
    """Bytes the driver sends to and receives from workers and tasks, while counting."""
    on: bool = False
    sent_bytes: int = 0
    received_bytes: int = 0
    calls: int = 0
    by_call: dict = field(default_factory=dict)

    def sent(self, obj: Any, what: str = "put") -> None:
        if self.on:
            n = sizeof(obj)
            self.sent_bytes += n
            self.calls += 1
            self.by_call[what] = self.by_call.get(what, 0) + n

    def received(self, obj: Any, what: str = "get") -> None:
        if self.on:
            n = sizeof(obj)
            self.received_bytes += n
            self.by_call[what] = self.by_call.get(what, 0) + n

    def reset(self, on: bool = True) -> None:
        self.on, self.sent_bytes, self.received_bytes, self.calls, self.by_call = on, 0, 0, 0, {}

    @property
    def total(self) -> int:
        return self.sent_bytes + self.received_bytes


TRAFFIC = Traffic()
