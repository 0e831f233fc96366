"""The base of every role's worker: one rank of one torch.distributed process group.

A worker is a plain Python class. :class:`rayalign.cluster.group.ActorGroup` hosts N
of them as Ray actors; tests and the GPU check construct one directly, in process,
with ``world_size=1`` (``Worker.local()``), so every role runs without Ray too.

Methods declare once how a group call is dispatched (the verl "single controller"
idea): ``@dispatch(SPLIT)`` splits the first argument across ranks and concatenates
the results; ``@dispatch(ALL)`` sends the same arguments to every rank and returns
rank 0's answer (collectives need every rank); ``@dispatch(EACH)`` returns the list.
"""
from __future__ import annotations

import datetime
import functools
import gc
import os
import socket
from typing import Any, Callable

ALL = "all"      # every rank runs it with the same args; rank 0's result is returned
EACH = "each"    # every rank runs it with the same args; the list of results is returned
SPLIT = "split"  # the first argument (a list) is split into contiguous chunks, one per rank


def dispatch(mode: str, out: str | None = None, takes: str | None = None) -> Callable:
    """Declare how a group call is dispatched. A SPLIT method also accepts a
    :class:`rayalign.batch.Rows` handle as its first argument: the rank loads its rows
    and the method sees them as per-row dicts (``takes``: only that column's values).
    ``out`` declares what the method returns per row: ``"rows"`` (dicts, e.g. samples)
    or a column name of :data:`rayalign.batch.COLUMNS`; given a handle, such a method
    answers ``(meta, Batch)`` and the batch stays in the object store."""
    if mode not in (ALL, EACH, SPLIT):
        raise ValueError(f"unknown dispatch mode {mode!r}")
    if (out or takes) and mode != SPLIT:
        raise ValueError("out= and takes= apply to split calls")

    def mark(fn: Callable) -> Callable:
        if mode != SPLIT:
            fn._rayalign_dispatch = mode
            return fn

        @functools.wraps(fn)
        def call(self, first, *args, **kwargs):
            from ..batch import Batch, Rows, column, meta_of

            if not isinstance(first, Rows):
                return fn(self, first, *args, **kwargs)
            given = first.load()
            rows = given.get(takes) if takes else given.to_rows()
            result = fn(self, rows, *args, **kwargs)
            if out is None:
                return result
            if out == "rows":
                if takes:  # the input column travels on with the answers (a rollout keeps its prompt)
                    result = [dict(r, **{takes: x}) for r, x in zip(result, rows)]
                batch = Batch.from_rows(result)
            else:
                batch = Batch({out: column(out, result)})
            return meta_of(batch), batch

        call._rayalign_dispatch = mode
        call._rayalign_out = out
        return call

    return mark


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process, measured by walking
    the heap (ZeRO partitions, gradient buffers and optimizer state included)."""
    import torch

    import warnings

    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some heap objects warns
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objs:
        try:
            if obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # some tensor subclasses refuse storage access
            continue
    return sum(v for k, v in seen.items() if k)


class SavedActivations:
    """Bytes autograd saves for backward inside the block (distinct storages, parameters
    left out: they are model state), and the bytes of ZeRO-3 parameters gathered at the
    block's end: what a micro-batch's forward adds on top of the state."""

    def __init__(self, module):
        self.module = module
        self.sizes: dict[int, int] = {}
        self.gathered = 0

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in self._params:
                self.sizes[st.data_ptr()] = max(self.sizes.get(st.data_ptr(), 0), st.nbytes())
        except Exception:
            pass
        return t

    def __enter__(self):
        import torch

        self._params = {p.data.untyped_storage().data_ptr() for p in self.module.parameters()}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for p in self.module.parameters():
            # Gathered ZeRO-3 weights are saved for backward too: counted once, here.
            self.sizes.pop(p.data.untyped_storage().data_ptr(), None)
            status = getattr(p, "ds_status", None)
            if status is not None and status.name == "AVAILABLE" and not getattr(p, "ds_persist", False):
                self.gathered += p.numel() * p.element_size()
        return False

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def _quiet_libraries() -> None:
    """Workers' logs reach the driver's console through Ray: keep them to what matters."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch.distributed.*deprecated.*")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class Worker:
    """One rank. Subclasses add the role's model and methods."""

    def __init__(self, rank: int = 0, world_size: int = 1, threads: int | None = None,
                 backend: str | None = None, env: dict[str, str] | None = None):
        for k, v in (env or {}).items():
            os.environ[k] = str(v)
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.threads = threads
        self._dist_ready = False
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # DeepSpeed picks its accelerator from this before anything imports it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if threads:
            torch.set_num_threads(threads)
        _quiet_libraries()

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def local(cls, *args, **kwargs) -> "Worker":
        """A one-rank worker in this process (no Ray), already joined to its group."""
        w = cls(0, 1, *args, **kwargs)
        w.init_distributed("127.0.0.1", free_port())
        return w

    @dispatch(EACH)
    def node_info(self) -> dict[str, Any]:
        """Where this rank runs: node, GPUs Ray gave it, process."""
        info = {"rank": self.rank, "pid": os.getpid(), "ip": node_ip(), "node_id": None,
                "gpu_ids": [], "bundle": None}
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["node_id"] = ctx.get_node_id()
                info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
                pg = ctx.get_placement_group_id()
                info["placement_group"] = pg
        except ImportError:
            pass
        return info

    def master_endpoint(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float = 300) -> bool:
        import torch

        # LOCAL_RANK is 0 for every rank: Ray gives each actor its own CUDA_VISIBLE_DEVICES.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        backend = self.backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(0)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s),
                                   rank=self.rank, world_size=self.world_size)
        self._dist_ready = True
        return True

    # Set by roles whose forwards are collective (ZeRO-3 gathers parameters in every
    # forward): then every rank must run the same number of forwards.
    lockstep = False

    def batches_for_all_ranks(self, n_items: int, batch_size: int) -> int:
        """How many batches this rank runs for ``n_items``: its own count, or under
        lockstep the largest count of any rank (the others run idle batches)."""
        import math

        n = math.ceil(n_items / batch_size) if n_items else 0
        if self.lockstep and self.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor([n], dtype=torch.long)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n = int(t.item())
        return n

    def lockstep_batches(self, items: list, batch_size: int, idle_item: Any = None):
        """This rank's batches of ``items`` as ``(batch, idle)``. Under lockstep, idle batches
        follow until every rank has run as many forwards: a rank whose share ran out runs its
        first item again (or ``idle_item`` when it has none) and drops the answer."""
        for b in range(self.batches_for_all_ranks(len(items), batch_size)):
            chunk = items[b * batch_size:(b + 1) * batch_size]
            if chunk:
                yield chunk, False
                continue
            filler = items[:1] or ([idle_item] if idle_item is not None else [])
            if not filler:
                raise ValueError(f"rank {self.rank}: no item to run an idle batch with")
            yield filler, True

    # Whether this rank's forwards lay sequences out packed (see algos.lm.Tokens); set by
    # init_model from the model config and what the architecture does with position ids.
    packing = False

    def check_packing(self, per_token: Callable, vocab_size: int) -> bool:
        """Whether ``per_token(tokens) -> [R, W, ...]`` gives the same per-token outputs for
        two sequences packed into one row as for the same sequences padded: the
        architecture must keep attention inside each sequence from the position ids alone
        (transformers' decoders do; encoders and custom models may not). A forward that
        refuses the packed inputs (no ``position_ids``) counts as no. Collective under
        ZeRO-3: every rank runs it."""
        import torch

        from ..algos.lm import layout

        g = torch.Generator().manual_seed(0)
        # Lengths 9 and 5 share one row of width 9 when packed: the check sees a boundary.
        seqs = [torch.randint(1, max(2, vocab_size), (n,), generator=g).tolist() for n in (9, 5, 4)]
        flat = []
        try:
            with torch.no_grad():
                for t in (layout(seqs, 0, False), layout(seqs, 0, True)):
                    flat.append(t.flat(per_token(t).float().cpu()))
        except (TypeError, ValueError, RuntimeError):
            return False
        return bool(torch.allclose(flat[0], flat[1], atol=1e-4, rtol=1e-3))

    @dispatch(ALL)
    def share_cores(self, ways: int = 1) -> int:
        """Use 1/ways of this rank's threads while ``ways`` roles run at once on the same
        cores (1 restores). Returns the thread count now in use."""
        import torch

        if not hasattr(self, "_own_threads"):
            self._own_threads = self.threads or torch.get_num_threads()
        n = max(1, self._own_threads // max(1, ways))
        torch.set_num_threads(n)
        return n

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> bool:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
            _forget_deepspeed_groups()
        return True


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups module-wide; after the world is destroyed, a worker
    started later in the same process (in-process checks, tests) must not find the old ones."""
    try:
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups
    except ImportError:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    ds_comm.cdb = None
