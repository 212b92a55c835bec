"""A model split over a group of processes: `mlxq.load(name, group=mx.distributed.init(...))`.

Start-up, on every rank at once:
1. open the checkpoint (headers only) and fingerprint it;
2. exchange, with one all_gather over the group, each rank's mlxq version, model fingerprint and settings (rank 0
   adds where its control plane listens): any difference stops every rank with one line naming it;
3. the other ranks connect to rank 0's control plane (`control.py`);
4. each rank loads only its share (`split.py`), tensor part by tensor part, and tells rank 0 what it holds and
   its peak memory; rank 0 waits for them all.

Rank 0 then has an ordinary `Model` whose one engine runs the whole group; every other rank calls `follow()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxq.api import Model
from mlxq.distributed.control import RANK_TIMEOUT_S, STEP_TIMEOUT_S, Control, Link, exchange
from mlxq.distributed.runner import GroupRunner, SlotNumbers, follow
from mlxq.distributed.split import Split, auto_mode, make_split
from mlxq.engine.scheduler import Engine
from mlxq.errors import ConfigError, InvalidRequest
from mlxq.experts import ExpertStats
from mlxq.formats import Checkpoint
from mlxq.models import text_config


class GroupModel(Model):
    """A model split over a group. On rank 0, a `Model` whose engine runs every rank (generate, stream, the server,
    sessions, `logits`); on the others, `follow()` runs rank 0's steps until rank 0 calls `shutdown()`."""

    def __init__(self, net, tokenizer, checkpoint: Checkpoint, name: str, *, group, split: Split,
                 control: Control | None = None, link: Link | None = None, model_fingerprint: str = ""):
        super().__init__(net, tokenizer, checkpoint, name)
        self.group, self.split, self.control, self.link = group, split, control, link
        self.rank = group.rank()
        self.slots = SlotNumbers()
        self.model_fingerprint = model_fingerprint  # the checkpoint's (`fingerprint`), alike on every rank
        self._share_fingerprint: str | None = None

    def _new_engine(self) -> Engine:
        if self.rank:
            raise InvalidRequest(f"rank {self.rank} follows rank 0: requests go to rank 0 (call follow() here)")
        opts = self._engine_options
        runner = GroupRunner(self.net, opts["prompt_cache_bytes"], self.control, self.slots, self._new_batch(),
                             self.split.rewindable, self.group, opts["prompt_cache_spill"], self.cache_fingerprint())
        return Engine(runner, self.tokenizer, max_batch=opts["max_batch"], prefill_chunk=opts["prefill_chunk"])

    def _new_batch(self):
        return getattr(self.net, "make_batch", None)  # a pipeline stage's micro-batches; else the runner's default

    def logits(self, token_ids) -> mx.array:
        """Full-sequence logits, float32 [len, vocab], computed by the whole group (fresh caches)."""
        ids = [int(t) for t in mx.array(token_ids).reshape(-1).tolist()]
        return self.engine.runner.score(ids).astype(mx.float32)

    def make_cache(self) -> list:
        raise InvalidRequest("a split model's caches live across its ranks; use generate, stream or logits")

    def cache_fingerprint(self) -> str:
        """What this rank's share of a saved cache must match: the checkpoint, the split, this rank's place in it,
        and what its share of the weights holds (every parameter's name, shape, type, and its first one's first
        values)."""
        if self._share_fingerprint is None:
            h = hashlib.sha256(json.dumps([self.model_fingerprint, self.split.describe()]).encode())
            params = tree_flatten(self.net.parameters())
            for name, a in params:
                h.update(f"{name}:{a.shape}:{a.dtype}\n".encode())
            h.update(np.array(params[0][1].reshape(-1)[:256].astype(mx.float32)).tobytes())
            self._share_fingerprint = h.hexdigest()[:32]
        return self._share_fingerprint

    def expert_stats(self) -> ExpertStats | None:
        """The streaming counters of the whole group (`Model.expert_stats`): every rank's pool counts its own experts,
        so hits, misses, reads and bytes add up; every rank sees every token, and ranks read and wait at once, so the
        token count and the times are the largest any rank has. None when no rank streams."""
        if not self.rank and not any(r.get("expert_slots") for r in self.control.status()["ranks"]):
            return None
        if self.rank:
            return super().expert_stats()
        ranks = [ExpertStats(**s) for s in self.engine.runner.expert_stats() if s is not None]
        most = {"tokens", "read_s", "stall_s", "compute_s"}
        return ExpertStats(**{f.name: (max if f.name in most else sum)(getattr(r, f.name) for r in ranks)
                              for f in dataclasses.fields(ExpertStats)})

    def save_slot(self, slot, path, extra) -> None:
        """Every rank writes its share of the conversation's cache (`runner.share_path`); see `GroupRunner`."""
        self.engine.runner.save_slot(slot, path, self.cache_fingerprint(), extra)

    def load_slot(self, slot, path) -> dict:
        return self.engine.runner.load_slot(slot, path, self.cache_fingerprint())

    def follow(self) -> None:
        """Runs rank 0's steps until it ends the group (returns), or until it is lost (raises EngineDown)."""
        if not self.rank:
            raise InvalidRequest("rank 0 leads the group: it submits requests, the other ranks follow")
        follow(self.net, self.link, self._new_batch(), self.split.rewindable, self.group, self.cache_fingerprint())

    def shutdown(self) -> None:
        """On rank 0: stops the engine and ends the group (the other ranks return from `follow()`)."""
        self.close()
        if self.control is not None:
            self.control.close()

    def status(self) -> dict:
        """The group as rank 0 sees it: state, error, and each rank's share, memory and last heartbeat."""
        return self.control.status() if self.control is not None else {"rank": self.rank}


def load_group(name: str | None, group, *, parallel: str | None = None, dtype: mx.Dtype | None = None,
               keep_quantized: bool | None = None, experts_per_tok: int | None = None,
               expert_memory: str | int | None = None, expert_options: dict | None = None,
               control_host: str | None = None, rank_timeout: float = RANK_TIMEOUT_S,
               step_timeout: float = STEP_TIMEOUT_S) -> GroupModel:
    """This rank's share of model `name`, split `parallel` (pipeline, tensor, experts; default: experts for a MoE
    model, else pipeline) over `group` (`mx.distributed.init()`); every rank calls it with the same arguments. A
    model with expert packs streams each rank's experts from its own packs within `expert_memory` (its own budget:
    a size, or a percentage of the experts it holds; default all of them; "8GB,6GB": one per rank, for Macs of
    different memory)."""
    import mlxq
    from mlxq.api import load_tokenizer_for
    from mlxq.loading import load_model, open_for_run

    rank, size = group.rank(), group.size()
    budget = rank_budget(expert_memory, rank, size)  # a wrong list fails here, before any rank waits
    if keep_quantized is None:  # alike on every rank (not by each one's free memory, as a single process decides)
        keep_quantized = mx.metal.is_available()
    ckpt = open_for_run(name, keep_quantized)
    config = text_config(ckpt.config)
    parallel = parallel or auto_mode(config)
    settings = {"parallel": parallel, "size": size, "dtype": str(dtype), "keep_quantized": keep_quantized,
                "experts_per_tok": experts_per_tok, "expert_memory": expert_memory, "expert_options": expert_options}
    control = Control(size, control_host or _ring_host(), rank_timeout=rank_timeout,
                      step_timeout=step_timeout) if rank == 0 else None
    model_fingerprint = fingerprint(ckpt)
    me = {"rank": rank, "version": mlxq.__version__, "model": model_fingerprint, "settings": settings}
    if control is not None:
        me["control"], me["token"] = control.address, control.token
    members = exchange(group, me)
    check_members(members)
    link = None
    if rank:
        link = Link(members[0]["control"], members[0]["token"], rank)
    else:
        control.accept()
    split = make_split(parallel, config, ckpt.tensors.infos(), rank, size, group,
                       dequantized=ckpt.format == "gguf" and not keep_quantized)
    # rank 0's tokenizer first: what loading it takes (its libraries) is no part of the rank's share of the weights
    tokenizer = None if rank else load_tokenizer_for(ckpt)
    rss_before = rss_bytes()
    net = load_model(ckpt, dtype, experts_per_tok=experts_per_tok, expert_memory=budget,
                     expert_options=expert_options, split=split)
    pool = getattr(net, "expert_pool", None)
    share = {"share": split.describe(), "weights_bytes": sum(v.nbytes for _, v in tree_flatten(net.parameters())),
             "expert_pool_bytes": 0 if pool is None else pool.nbytes,
             "expert_slots": 0 if pool is None else sum(s.n for s in set(pool.groups.values())),
             "experts_held": 0 if pool is None else sum(lp.n_experts for lp in pool.packs.layers.values()),
             "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss_bytes(), "pid": os.getpid(),
             "host": socket.gethostname()}
    if rank:
        link.send({"ready": share})
    else:
        control.own = share
        control.wait_ready()
    return GroupModel(net, tokenizer, ckpt, name or "smollm2", group=group, split=split, control=control, link=link,
                      model_fingerprint=model_fingerprint)


def rank_budget(expert_memory: str | int | None, rank: int, size: int) -> str | int | None:
    """This rank's expert budget: the same for all, or from a list with one per rank ("8GB,6GB")."""
    if not isinstance(expert_memory, str) or "," not in expert_memory:
        return expert_memory
    budgets = [b.strip() for b in expert_memory.split(",")]
    if len(budgets) != size:
        raise ConfigError(f"expert memory '{expert_memory}': {len(budgets)} budgets for a group of {size} ranks "
                          "(give one, or one per rank)")
    return budgets[rank]


def fingerprint(ckpt: Checkpoint) -> str:
    """What identifies a checkpoint without reading its weights: its config and every tensor's name, shape, type."""
    h = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True, default=str).encode())
    for info in sorted(ckpt.tensors.infos(), key=lambda i: i.name):
        h.update(f"{info.name}|{info.shape}|{info.dtype}\n".encode())
    return h.hexdigest()[:16]


def check_members(members: list[dict[str, Any]]) -> None:
    """Every rank runs the same mlxq on the same model with the same settings (else one line naming the first
    difference, raised on every rank alike)."""
    lead = members[0]
    for m in members[1:]:
        r = m["rank"]
        if m["version"] != lead["version"]:
            raise ConfigError(f"distributed: rank {r} runs mlxq {m['version']} but rank 0 runs {lead['version']}: "
                              "every rank must run the same mlxq")
        if m["model"] != lead["model"]:
            raise ConfigError(f"distributed: rank {r} opened a different model (fingerprint {m['model']}, rank 0 "
                              f"has {lead['model']}): every rank must load the same checkpoint")
        for key, value in lead["settings"].items():
            if m["settings"].get(key) != value:
                raise ConfigError(f"distributed: rank {r} has {key}={m['settings'].get(key)} but rank 0 has "
                                  f"{key}={value}: every rank must be started with the same options")


def _ring_host() -> str:
    """Where rank 0's control plane listens: rank 0's address in the ring's host file (reachable by the ranks next
    to it; every rank must reach it, `control_host` says otherwise), else loopback."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        hosts = json.loads(Path(path).read_text()) if path else None
        return hosts[0][0].rsplit(":", 1)[0]
    except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return "127.0.0.1"


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux: VmHWM, since ru_maxrss counts a forked parent's pages)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
