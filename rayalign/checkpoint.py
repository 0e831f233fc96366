"""The one way to save training state: sharded, atomic, world-size independent checkpoints
on any filesystem ``fsspec`` reaches (a local path, ``file://``, ``s3://``, ``gs://``, ...).

A checkpoint is a directory ``step_00000012/`` holding

* ``shard-00000-of-00002.safetensors`` ... — written by each rank for the parameters' elements
  it owns under ZeRO: fp32 weights and Adam moments as 1-D fragments of the flattened
  parameter, each with its offset and the parameter's full shape in the file's metadata.
  No rank ever gathers another rank's state to save.
* ``files/`` — a role's small side files (reward statistics, an Aligner's template record).
* ``state.json`` — step counters, scheduler position, the trainer's own state; written last,
  by rank 0, once every rank has written its shard. A step directory without it is a save that
  did not finish and is never resumed from.

A rank resuming at the same world size and ZeRO layout reads exactly the byte ranges it owns,
which are its own shard; at another world size or stage each rank reads the ranges it now owns
from whichever shards hold them (a universal checkpoint without a conversion step).

``latest`` (one role) and ``committed.json`` (several roles, one step) are small pointers
replaced atomically after the directories they point to are complete, so a crash mid-save
leaves the previous checkpoint as the one to resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import RayalignError


class CheckpointError(RayalignError, RuntimeError):
    pass


# ---------------------------------------------------------------- storage (fsspec)

def fs_of(uri: str | Path):
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as exc:
        raise CheckpointError(f"checkpoint storage {str(uri)!r}: {exc} (install the fsspec backend for "
                              "this URI scheme, e.g. s3fs for s3://, gcsfs for gs://)") from None


def join(root: str | Path, *parts: str) -> str:
    root = str(root)
    return "/".join([root.rstrip("/") if root != "/" else "", *parts]) if parts else root


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def exists(uri: str | Path) -> bool:
    fs, p = fs_of(uri)
    return fs.exists(p)


def read_text(uri: str | Path) -> str:
    fs, p = fs_of(uri)
    with fs.open(p, "r") as fh:
        return fh.read()


def write_text(uri: str | Path, text: str) -> None:
    """Replace a small file atomically: a local rename, or one object put on object stores."""
    fs, p = fs_of(uri)
    if _is_local(fs):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", dir=os.path.dirname(p) or ".")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    else:
        fs.pipe_file(p, text.encode())


def remove(uri: str | Path) -> None:
    fs, p = fs_of(uri)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def makedirs(uri: str | Path) -> None:
    fs, p = fs_of(uri)
    fs.makedirs(p, exist_ok=True)


def listdir(uri: str | Path) -> list[str]:
    """Names directly under ``uri`` (empty if it does not exist)."""
    fs, p = fs_of(uri)
    if not fs.exists(p):
        return []
    return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


@contextlib.contextmanager
def local_dir(uri: str):
    """A local directory whose files end up at ``uri`` (itself, when ``uri`` is local)."""
    fs, p = fs_of(uri)
    if _is_local(fs):
        Path(p).mkdir(parents=True, exist_ok=True)
        yield Path(p)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        fs.put(tmp + "/", p, recursive=True)


@contextlib.contextmanager
def local_copy(uri: str):
    """A local directory with the files under ``uri`` (itself, when ``uri`` is local)."""
    fs, p = fs_of(uri)
    if _is_local(fs):
        yield Path(p)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if fs.exists(p):
            fs.get(p + "/", tmp, recursive=True)
        yield Path(tmp)

# ---------------------------------------------------------------- step directories

STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | Path, step: int) -> str:
    return join(root, f"step_{step:08d}")


def is_complete(ckpt: str | Path) -> bool:
    return exists(join(ckpt, "state.json"))


def begin(root: str | Path, step: int) -> str:
    """Start writing checkpoint ``step`` (one caller, before any rank writes into it): a
    previous, unfinished or superseded save of the same step is removed first."""
    d = step_dir(root, step)
    remove(d)
    makedirs(d)
    makedirs(join(d, "files"))
    return d


def finish(root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> str:
    """Mark checkpoint ``step`` complete (after every rank has written into it), point
    ``latest`` at it and prune all but the newest ``keep`` complete steps (0: prune nothing)."""
    d = step_dir(root, step)
    write_text(join(d, "state.json"), json.dumps(dict(state, step=step, format=2), indent=1))
    write_text(join(root, "latest"), os.path.basename(d) + "\n")
    if keep > 0:
        steps = [n for n in listdir(root) if STEP_RE.match(n)]
        complete = [n for n in steps if is_complete(join(root, n))]
        # Older steps beyond ``keep``, and saves that never finished (saves run in order, so
        # an unfinished older one will never be completed).
        stale = complete[:-keep] + [n for n in steps if n not in complete and int(n[5:]) < step]
        for n in stale:
            remove(join(root, n))
    return d


def write(root: str | Path, step: int, fill: Callable[[Path], dict[str, Any]], keep: int = 2) -> str:
    """A checkpoint with one writer: ``fill(local_dir)`` writes the files and returns the state
    to record. On a remote root the files are written locally first and uploaded."""
    d = begin(root, step)
    try:
        with local_dir(d) as out:
            state = fill(out)
    except BaseException:
        remove(d)
        raise
    return finish(root, step, state, keep)


def latest(root: str | Path) -> str | None:
    ptr = join(root, "latest")
    if not exists(ptr):
        return None
    d = join(root, read_text(ptr).strip())
    if not is_complete(d):
        raise CheckpointError(f"{ptr} points to {d}, which is not a complete checkpoint")
    return d


def read_state(ckpt: str | Path) -> dict[str, Any]:
    p = join(ckpt, "state.json")
    if not exists(p):
        raise CheckpointError(f"{ckpt} is not a checkpoint (no state.json)")
    return json.loads(read_text(p))


COMMIT_FILE = "committed.json"


def commit(root: str | Path, step: int, roles: list[str], keep: int = 1) -> None:
    """Record that every role under ``root/<role>/`` has saved ``step``: the one point at which a
    checkpoint of several roles becomes the one to resume. Roles save with ``keep=0`` (no pruning
    of their own) so that a crash between two roles' saves leaves the previous commit whole;
    pruning happens here, after the commit, and keeps the newest ``keep`` committed steps."""
    for r in roles:
        if not is_complete(step_dir(join(root, r), step)):
            raise CheckpointError(f"cannot commit step {step}: role {r!r} has no complete checkpoint at "
                                  f"{step_dir(join(root, r), step)}")
    prev = last_commit(root)
    kept = sorted(set((prev or {}).get("kept", [])) | {step})
    kept = [s for s in kept if s <= step][-max(keep, 1):]
    write_text(join(root, COMMIT_FILE), json.dumps({"step": step, "roles": list(roles), "kept": kept}) + "\n")
    for r in roles:
        for name in listdir(join(root, r)):
            m = STEP_RE.match(name)
            # Uncommitted or superseded steps, and temporary directories a crash left behind.
            if (m and int(m.group(1)) not in kept) or name.startswith(".step_"):
                remove(join(root, r, name))


def last_commit(root: str | Path) -> dict[str, Any] | None:
    """The newest multi-role commit under ``root`` (``{"step", "roles", "kept"}``), or None."""
    p = join(root, COMMIT_FILE)
    if not exists(p):
        return None
    c = json.loads(read_text(p))
    for r in c["roles"]:
        d = step_dir(join(root, r), c["step"])
        if not is_complete(d):
            raise CheckpointError(f"{p} commits step {c['step']}, but {d} is not a complete checkpoint; "
                                  "the run directory was changed after the commit")
    return c


# ---------------------------------------------------------------- safetensors, streamed

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _st_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for k, v in _DTYPES.items():
        if v == name:
            return k
    raise CheckpointError(f"no safetensors dtype for {dtype}")


def nbytes(dtype, shape) -> int:
    import torch

    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors(uri: str | Path, specs: list[tuple[str, Any, tuple]], tensors: Iterable,
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from ``tensors`` (an iterable yielding, in the order of
    ``specs`` = [(key, dtype, shape)], one tensor at a time): the header is written from the
    specs first, then each tensor as it arrives, so at most one tensor's bytes are in flight
    and a tensor that is a view into larger state is written without a copy. Returns bytes."""
    import torch

    header: dict[str, Any] = {}
    off = 0
    for key, dtype, shape in specs:
        n = nbytes(dtype, shape)
        header[key] = {"dtype": _st_dtype(dtype), "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    fs, p = fs_of(uri)
    it = iter(tensors)
    with fs.open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for key, dtype, shape in specs:
            t = next(it, None)
            if t is None:
                raise CheckpointError(f"{uri}: no tensor arrived for {key}")
            if tuple(t.shape) != tuple(int(s) for s in shape):
                raise CheckpointError(f"{uri}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            t = t.detach()
            if t.dtype != dtype:
                t = t.to(dtype)
            t = t.cpu().contiguous()
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(raw) + off


def read_header(fh) -> tuple[dict, int]:
    """(header, byte offset of the data) of an open safetensors file."""
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > 100 * 2**20:
        raise CheckpointError("safetensors header larger than 100 MiB: not a safetensors file")
    return json.loads(fh.read(n)), 8 + n


# ---------------------------------------------------------------- sharded training state

KINDS = ("weight", "exp_avg", "exp_avg_sq")


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def write_shard(ckpt: str | Path, rank: int, world_size: int,
                fragments: list[tuple[str, tuple, int, dict[str, Any]]]) -> int:
    """This rank's part of a checkpoint. ``fragments``: (parameter name, full shape, start
    element in the flattened parameter, {kind: 1-D tensor}) for each parameter range this
    rank owns."""
    import torch

    specs, tensors, meta = [], [], {}
    for name, shape, start, parts in fragments:
        meta[name] = [int(start), [int(s) for s in shape]]
        for kind in KINDS:
            t = parts.get(kind)
            if t is not None and t.numel():
                specs.append((f"{kind}/{name}", torch.float32, (int(t.numel()),)))
                tensors.append(t)
    return write_safetensors(join(ckpt, shard_name(rank, world_size)), specs, tensors,
                             {"fragments": json.dumps(meta), "rank": rank, "world_size": world_size})


class Shards:
    """Read any element range of any parameter (or its Adam moments) from a checkpoint's
    shards, touching only the files and bytes that hold it."""

    def __init__(self, ckpt: str | Path):
        self.ckpt = str(ckpt)
        names = [n for n in listdir(ckpt) if n.startswith("shard-") and n.endswith(".safetensors")]
        if not names:
            raise CheckpointError(f"{ckpt} has no shard files: not a sharded checkpoint (format 2), or "
                                  "incomplete")
        self.fs, _ = fs_of(ckpt)
        self.shapes: dict[str, tuple] = {}
        self.index: dict[tuple[str, str], list[tuple[int, int, str, int]]] = {}  # -> (start, numel, file, byte)
        self.files_read: set[str] = set()
        self.bytes_read = 0
        self._open: dict[str, Any] = {}
        for n in names:
            path = fs_of(join(ckpt, n))[1]
            with self.fs.open(path, "rb") as fh:
                header, data0 = read_header(fh)
            frags = json.loads(header.get("__metadata__", {}).get("fragments", "{}"))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                kind, name = key.split("/", 1)
                start, shape = frags[name]
                self.shapes[name] = tuple(shape)
                numel = int(info["shape"][0])
                self.index.setdefault((kind, name), []).append((int(start), numel, path,
                                                                data0 + info["data_offsets"][0]))
        for v in self.index.values():
            v.sort()

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.index

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def read(self, kind: str, name: str, lo: int = 0, hi: int | None = None):
        """Elements [lo, hi) of the flattened fp32 ``kind`` of parameter ``name``."""
        import torch

        if (kind, name) not in self.index:
            raise CheckpointError(f"{self.ckpt}: no {kind} saved for parameter {name!r}")
        hi = self.numel(name) if hi is None else hi
        out = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        for start, numel, path, byte in self.index[(kind, name)]:
            a, b = max(lo, start), min(hi, start + numel)
            if a >= b:
                continue
            fh = self._open.get(path)
            if fh is None:
                fh = self._open[path] = self.fs.open(path, "rb")
                self.files_read.add(os.path.basename(path))
            fh.seek(byte + 4 * (a - start))
            buf = fh.read(4 * (b - a))
            out[a - lo:b - lo] = torch.frombuffer(bytearray(buf), dtype=torch.float32)
            self.bytes_read += len(buf)
            covered += b - a
        if covered != hi - lo:
            raise CheckpointError(f"{self.ckpt}: the shards hold {covered} of the {hi - lo} elements "
                                  f"[{lo}, {hi}) of {kind} {name!r}; a shard file is missing")
        return out

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def __enter__(self) -> "Shards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_chunks(items: list, limit: int, size: Callable[[Any], int]) -> Iterator[list]:
    """Consecutive groups of ``items`` of at most ``limit`` total size (an item larger than
    the limit is a group of its own)."""
    group, total = [], 0
    for it in items:
        s = size(it)
        if group and total + s > limit:
            yield group
            group, total = [], 0
        group.append(it)
        total += s
    if group:
        yield group
