"""The parts of `mlxq.distributed` that need no group: how models are split (shares, heads, layers), the start-up
checks, and the control plane's failure detection, driven by plain sockets standing in for the other ranks."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)

from mlxq.distributed.control import Control
from mlxq.distributed.group import check_members, rank_budget
from mlxq.distributed.runner import GroupRunner
from mlxq.distributed.split import PipelineSplit, balance, even_ranges, head_ranges
from mlxq.engine.prompt_cache import PromptCache
from mlxq.engine.runner import Runner
from mlxq.errors import ConfigError, EngineDown
from mlxq.formats.base import TensorInfo


# ---------------------------------------------------------------------------------------------- shares
def test_even_ranges_cover_the_units_and_keep_the_alignment():
    assert even_ranges(96, 3) == [(0, 32), (32, 64), (64, 96)]
    assert even_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert even_ranges(256, 3, align=64) == [(0, 64), (64, 128), (128, 256)]  # boundaries stay on group edges
    with pytest.raises(ConfigError):
        even_ranges(2, 3)


def test_head_ranges_keep_each_query_head_with_its_key_value_head():
    # 4 query heads over 2 KV heads on 3 ranks: the first KV head's two queries go to two ranks
    assert head_ranges(4, 2, 3) == [((0, 1), (0, 1)), ((1, 2), (0, 1)), ((2, 4), (1, 2))]
    assert head_ranges(32, 2, 4) == [((0, 8), (0, 1)), ((8, 16), (0, 1)), ((16, 24), (1, 2)), ((24, 32), (1, 2))]
    assert head_ranges(8, 8, 2) == [((0, 4), (0, 4)), ((4, 8), (4, 8))]
    assert head_ranges(6, 3, 4)[1] == ((1, 3), (0, 2))  # one query of each of two KV heads: still one to one
    with pytest.raises(ConfigError, match="heads"):
        head_ranges(8, 2, 3)  # rank 1 would hold 3 queries of 2 KV heads, a ratio the kernel cannot map
    with pytest.raises(ConfigError):
        head_ranges(2, 1, 3)  # more ranks than heads


def test_pipeline_balance_counts_the_embedding_on_rank_zero():
    assert balance([10] * 6, 0, 2) == [0, 3, 6]
    assert balance([10] * 6, 20, 2) == [0, 2, 6]  # rank 0 also holds 20 bytes of embedding and head
    assert balance([1, 1, 1], 1000, 3) == [0, 1, 2, 3]  # every rank gets at least one layer


def test_pipeline_balances_a_gguf_by_the_bytes_its_tensors_take_once_loaded():
    """A GGUF stores its embedding at 8 bits and its layers at 4 (SmolLM2 Q4_1): by file bytes the embedding is
    light, but dequantized at load every tensor takes 4 bytes a weight, and the layers must be balanced by that."""
    infos = [TensorInfo("model.embed_tokens.weight", (49152, 576), "Q8_0", 49152 * 576 * 34 // 32)]
    infos += [TensorInfo(f"model.layers.{i}.mlp.up_proj.weight", (3072, 1152), "Q4_1", 3072 * 1152 * 20 // 32)
              for i in range(30)]
    config = {"num_hidden_layers": 30}
    assert PipelineSplit(config, infos, 0, 2).bounds == [0, 8, 30]  # by file bytes: blocks kept
    assert PipelineSplit(config, infos, 0, 2, dequantized=True).bounds == [0, 11, 30]  # 4 bytes a weight each


# ---------------------------------------------------------------------------------------------- start-up
MEMBER = {"rank": 0, "version": "0.1.0", "model": "abc", "settings": {"parallel": "pipeline", "size": 2}}


def test_start_up_checks_name_the_rank_and_what_differs():
    check_members([MEMBER, {**MEMBER, "rank": 1}])
    with pytest.raises(ConfigError, match="rank 1 runs mlxq 0.2.0 but rank 0 runs 0.1.0"):
        check_members([MEMBER, {**MEMBER, "rank": 1, "version": "0.2.0"}])
    with pytest.raises(ConfigError, match="rank 2 opened a different model"):
        check_members([MEMBER, {**MEMBER, "rank": 1}, {**MEMBER, "rank": 2, "model": "def"}])
    other = {**MEMBER, "rank": 1, "settings": {"parallel": "tensor", "size": 2}}
    with pytest.raises(ConfigError, match="rank 1 has parallel=tensor but rank 0 has parallel=pipeline"):
        check_members([MEMBER, other])


# ---------------------------------------------------------------------------------------------- control plane
class FakeRank:
    """A rank's end of the control plane: says hello, answers pings while `answering`, records the steps."""

    def __init__(self, control: Control, rank: int, token: str | None = None):
        host, port = control.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.answering = True
        self.steps: list[dict] = []
        self.sock.sendall(json.dumps({"hello": rank, "token": token or control.token}).encode() + b"\n")
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, msg: dict) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read(self) -> None:
        try:
            for line in self.sock.makefile("rb"):
                msg = json.loads(line)
                if msg["op"] == "ping":
                    if self.answering:
                        self.send({"pong": msg["args"]["n"]})
                else:
                    self.steps.append(msg)
        except ConnectionError:  # the control side closed this rank (what some tests are about): the reader ends
            pass


def started(size: int = 3, **kw) -> tuple[Control, list[FakeRank], list[EngineDown]]:
    control = Control(size, rank_timeout=kw.pop("rank_timeout", 30.0), **kw)
    downs: list[EngineDown] = []
    control.on_down = downs.append
    ranks: list[FakeRank] = []
    joining = threading.Thread(target=lambda: ranks.extend(FakeRank(control, r) for r in range(1, size)))
    joining.start()
    control.accept(timeout=30)
    joining.join()
    for rank, r in enumerate(ranks, start=1):
        r.send({"ready": {"share": {"rank": rank}}})
    control.wait_ready()
    return control, ranks, downs


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_steps_reach_every_rank_in_order():
    control, ranks, _ = started()
    for i in range(5):
        control.post("decode", tokens=[i])
    assert wait_for(lambda: all(len(r.steps) == 5 for r in ranks))
    assert all([s["args"]["tokens"] for s in r.steps] == [[0], [1], [2], [3], [4]] for r in ranks)
    control.close()


def test_a_stranger_without_the_token_is_turned_away():
    control = Control(2, rank_timeout=30)
    stranger = threading.Thread(target=lambda: FakeRank(control, 1, token="guess"))
    stranger.start()
    with pytest.raises(Exception, match="did not connect"):
        control.accept(timeout=2)
    stranger.join()


def test_a_rank_that_disconnects_degrades_the_group_at_once():
    control, ranks, downs = started()
    ranks[1].sock.shutdown(socket.SHUT_RDWR)  # as when its process dies: the connection closes
    assert wait_for(lambda: downs)
    assert "rank 2 disconnected" in str(downs[0]) and control.status()["state"] == "degraded"
    with pytest.raises(EngineDown, match="degraded: rank 2 disconnected"):
        control.post("decode", tokens=[1])
    assert wait_for(lambda: any(s["op"] == "abort" for s in ranks[0].steps))  # the rank left standing is told


def test_a_rank_that_stops_answering_heartbeats_is_lost():
    control, ranks, downs = started(rank_timeout=2.0)
    ranks[0].answering = False
    assert wait_for(lambda: downs, timeout=20)
    assert "rank 1 stopped answering" in str(downs[0])


def test_a_step_that_never_ends_is_caught_by_the_watchdog():
    control, ranks, downs = started(step_timeout=2.0)
    with control.step():  # every rank answers heartbeats, but the step (a collective) never returns
        assert wait_for(lambda: downs, timeout=20)
    assert "a step has run for" in str(downs[0])


# Runner methods that read this process's state or hold its own wiring: nothing the other ranks must repeat
LOCAL_ONLY = {"attach", "lengths", "state", "mtp_state", "idle", "stats", "close"}


def test_the_group_runner_forwards_every_runner_operation():
    """An operation of the one engine's Runner that rank 0 ran alone would leave the other ranks' caches behind, and
    the next collective would pair the wrong steps: every operation must be posted to the group (and followed)."""
    ops = {name for name, f in vars(Runner).items() if callable(f) and not name.startswith("_")} - LOCAL_ONLY
    missing = sorted(name for name in ops if name not in vars(GroupRunner))
    assert not missing, f"GroupRunner runs {missing} on rank 0 only; post them to the group as its other steps"


def test_a_pipeline_gives_back_every_hidden_state_in_row_order():
    """Rank 0's MTP head reads row b's hidden states as `batch.hidden[b]`: the micro-batches' (rows 0 and 2 in one,
    1 and 3 in the other, each padded to its own longest row) come back as one array in row order."""
    import mlx.core as mx

    from mlxq.distributed.pipeline import PipelineBatch

    first = mx.array([[[0.0], [0.5]], [[2.0], [2.5]]])  # [rows, 2 positions, D = 1]: row r's values r, r + 0.5, ...
    second = mx.array([[[1.0], [1.5], [1.75]], [[3.0], [3.5], [3.75]]])
    out = PipelineBatch._in_row_order([[0, 2], [1, 3]], [first, second])
    assert out.shape == (4, 3, 1)
    assert out[:, :2, 0].tolist() == [[0, 0.5], [1, 1.5], [2, 2.5], [3, 3.5]]
    assert out[:, 2, 0].tolist() == [0, 1.75, 0, 3.75]  # the shorter micro-batch padded on the right


def test_the_prompt_cache_of_another_rank_replays_rank_zeros_decisions(tmp_path):
    """Sizes differ between ranks (each holds a share of the model): the other ranks take rank 0's plans, so both
    keep the same entries in memory and the same files in their spills, and read the same ones back, even where
    their own sizes would decide otherwise."""
    import mlx.core as mx

    from mlxq.engine.cache import KVCache
    from mlxq.engine.prompt_cache import DiskSpill

    def caches(tokens: int, width: int) -> list:
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 1, tokens, width)), mx.zeros((1, 1, tokens, width)))
        return [c]

    def cache(name: str) -> PromptCache:  # 8 bytes a token per unit of width in memory; 6000 bytes on disk
        return PromptCache(lambda: [KVCache()], max_bytes=3000, spill=DiskSpill(tmp_path / name, 6000, "m",
                                                                                lambda: [KVCache()]))

    lead, other = cache("lead"), cache("other")
    for start in range(0, 80, 10):
        tokens = list(range(start, start + 10))
        plan = lead.store(tokens, caches(10, 16))  # 1280 bytes an entry: the third evicts the first, to disk
        other.store(tokens, caches(10, 1), plan=plan)  # 80 bytes an entry: would keep them all, and every file
    for prompt, resumed in ((list(range(0, 10)) + [99], 0), (list(range(50, 60)) + [99], 10)):  # dropped; on disk
        _, n, plan = lead.fetch(prompt)
        assert other.fetch(prompt, plan=plan)[1] == n == resumed
    for c in (lead, other):
        assert len(c) == 2
        assert c.fetch(list(range(70, 80)) + [99])[1] == 10  # in memory
    files = [sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("lead", "other")]
    assert files[0] == files[1] and 0 < len(files[0]) < lead.spill.writes, files  # (some dropped)


def test_each_rank_takes_its_own_budget_from_a_list():
    assert [rank_budget("8GB,6GB", r, 2) for r in range(2)] == ["8GB", "6GB"]
    assert rank_budget("25%", 1, 3) == "25%" and rank_budget(None, 0, 2) is None and rank_budget(10**9, 1, 2) == 10**9
    with pytest.raises(ConfigError, match="2 budgets for a group of 3 ranks"):
        rank_budget("8GB,6GB", 0, 3)


def test_a_rank_reads_ahead_only_its_own_experts_at_their_places_in_its_packs():
    """Under the experts split a rank's packs hold its share (experts 4..7 here at positions 0..3): what the next
    layer's router predicts is read ahead at the share's positions, and other ranks' experts are not read."""
    from types import SimpleNamespace

    import mlx.core as mx

    from mlxq.experts.stream import StreamedMoE

    class Pool:
        packs = SimpleNamespace(layers={1: SimpleNamespace(n_experts=4)})
        asked: list = []

        def capacity(self, layer: int) -> int:
            return 4

        def request(self, layer: int, ids, prefetch: bool = False) -> None:
            self.asked.append((layer, [int(i) for i in ids], prefetch))

    nxt = SimpleNamespace(layer=1, first=4, next=None, route=lambda x: (mx.array([[5, 6], [1, 7]]), None))
    pool = Pool()
    StreamedMoE._read_ahead(SimpleNamespace(next=nxt, pool=pool), mx.zeros((2, 8)), 1)
    assert pool.asked == [(1, [1, 2, 3], True)]  # experts 5, 6, 7; expert 1 is rank 0's
