"""One model served by a group of processes (`mlxq.distributed`) on MLX's ring backend: 2 and 3 local ranks on the
CPU, loopback only, every process ended by the test.

- Every split (pipeline, tensor, experts) of a tiny dense model (Llama), a tiny hybrid (Qwen3.5: Gated DeltaNet
  and gated attention) and a tiny MoE (Qwen3-Next: hybrid, routed and shared experts, a dense layer among them)
  gives the single-process model's full-sequence logits (float32, <= 1e-5 relative) and the same greedy tokens,
  for requests batched together, a prompt resumed from the prompt cache, a conversation from its slot, and a
  request with speculative drafts (some taken, some rolled back) batched beside a plain one.
- The experts split combines by all_sum or by all_gather of only the rows each rank computed: both give those logits.
- A model with expert packs streams on every rank (experts and pipeline splits): each rank reads only its own experts
  within its own budget (half of them), and the group gives the single-process logits and tokens.
- Each rank holds only its share: its peak RSS grows by about the bytes of its share, far below the model's
  (pipeline, tensor and experts splits; 2 ranks, and 3 in the slow suite).
- A rank killed (or frozen) mid-generation: the server answers the request with an error and /health says the
  group is degraded; nothing hangs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from group_worker import probe, probe_mtp, probe_session, probe_spill
from test_hybrid import make_tiny as make_hybrid
from tiny import make_tiny, save_tiny_tokenizer

import mlxq
from mlxq.distributed.launch import free_loopback_ports
from mlxq.models import text_config

WORKER = Path(__file__).with_name("group_worker.py")
PYTHON = sys.executable
SPLITS = {"dense": ("pipeline", "tensor"), "hybrid": ("pipeline", "tensor"), "moe": ("pipeline", "tensor", "experts")}
GROUP_TIMEOUT_S = 900  # the whole of one group's run, however loaded the machine; a hang fails, never waits forever


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_file(tmp: Path, n: int) -> Path:
    path = tmp / f"ring-{n}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n)]))
    return path


def run_ranks(n: int, args: list[str], tmp: Path, timeout: float = GROUP_TIMEOUT_S) -> list[str]:
    """Runs `python ARGS` as ranks 0..n-1 of a ring; their outputs. Every process is ended, whatever happens."""
    ring = ring_file(tmp, n)
    procs = [subprocess.Popen([PYTHON, *args], env={**os.environ, "MLX_HOSTFILE": str(ring), "MLX_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [f"rank {r} exited {p.returncode}:\n{out[-3000:]}"
              for r, (p, out) in enumerate(zip(procs, outs, strict=True)) if p.returncode]
    assert not failed, "\n".join(failed)
    return outs


def run_group(cases: list[dict], ranks: int, tmp: Path, compare: bool = True) -> list[str]:
    """Runs `cases` (`group_worker.py`'s plan) on a ring of `ranks`; the ranks' outputs. With `compare`, fails on
    any difference from what one process gave (`differences`)."""
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"cases": cases}))
    outputs = run_ranks(ranks, [str(WORKER), str(plan)], tmp)
    wrong = [line for case in cases for line in differences(case, ranks)] if compare else []
    assert not wrong, "\n".join(wrong)
    return outputs


def probe_alone(path: Path, probe_with=probe) -> None:
    """What one process gives for the model at `path` (`path/single`)."""
    model = mlxq.load(str(path))
    probe_with(model, path / "single")
    model.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny models (with a character tokenizer), and what the single process gives for each."""
    made = {}
    for name, (make, arch) in {"dense": (make_tiny, "llama"), "hybrid": (make_hybrid, "qwen3_5_text"),
                               "moe": (make_hybrid, "qwen3_next")}.items():
        path = tmp_path_factory.mktemp(name)
        make(arch, path)
        save_tiny_tokenizer(path, 160)
        probe_alone(path)
        made[name] = path
    return made


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def differences(case: dict, ranks: int) -> list[str]:
    """How what the group gave for a case differs from what one process gave (the probe in `<model>/single`)."""
    got, want = Path(case["out"]), Path(case["model"]) / "single"
    what = f"{Path(case['model']).name} {case['parallel']} x{ranks}"
    wrong = []
    for logits in ("logits", "draft_logits"):
        if (want / f"{logits}.npy").exists():
            error = rel(np.load(got / f"{logits}.npy"), np.load(want / f"{logits}.npy"))
            if not error <= 1e-5:
                wrong.append(f"{what}: {logits} differ by {error:.2e} (relative)")
    result, expected = json.loads((got / "result.json").read_text()), json.loads((want / "result.json").read_text())
    status = json.loads((got / "status.json").read_text())
    assert status["state"] == "ok" and len(status["ranks"]) == ranks
    assert {r["share"]["parallel"] for r in status["ranks"]} == {case["parallel"]}
    for key, value in expected.items():
        if result[key] != value:
            wrong.append(f"{what}: {key} {result[key]} != single process {value}")
    return wrong


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_split_matches_the_single_process_model(models, tmp_path, ranks):
    cases = [{"model": str(path), "parallel": mode, "out": str(tmp_path / f"{name}-{mode}")}
             for name, path in models.items() for mode in SPLITS[name]]
    # the experts split combines by all_gather where that moves fewer bytes (some prompts on 2 ranks here), else by
    # all_sum (every decode step): the gather, forced everywhere
    forced = "gather"
    cases.append({"model": str(models["moe"]), "parallel": "experts", "out": str(tmp_path / f"moe-{forced}"),
                  "combine": forced})
    run_group(cases, ranks, tmp_path)
    combines = {case.get("combine", "auto"): json.loads((Path(case["out"]) / "combines-0.json").read_text())
                for case in cases if case["parallel"] == "experts"}
    assert combines[forced][forced] > 0 and sum(combines[forced].values()) == combines[forced][forced], combines
    assert combines["auto"]["sum"] > 0 and (ranks == 3 or combines["auto"]["gather"] > 0), combines
    # what was compared exercised the caches: a prefix resumed from the prompt cache, a turn from its slot
    dense = json.loads((models["dense"] / "single" / "result.json").read_text())
    assert dense["resumed_cached"] > 0 and dense["slot"][1]["cached"] > 0, dense
    # and speculative decoding, with the tokens plain greedy decoding gives: drafts taken on every model, and
    # drafts rolled back on the dense one (attention moves back) and the hybrid (DeltaNet's checkpoint restored)
    for name in models:
        single = json.loads((models[name] / "single" / "result.json").read_text())
        assert single["speculative"] == single["speculative_plain"] and single["accepted_drafts"] > 0, (name, single)
        assert name == "moe" or single["accepted_drafts"] < single["drafted"], (name, single)


# ---------------------------------------------------------------------------------------------- MTP head
MTP_SPLITS = {"mtp-dense": ("pipeline", "tensor"), "mtp-moe": ("pipeline", "tensor", "experts")}


@pytest.fixture(scope="module")
def mtp_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3.5s (hybrid: Gated DeltaNet and gated attention; dense, and MoE) with an MTP head (`mtp.*`) that
    predicts the model's next token most of the time (drafts taken and rolled back), and what one process gives."""
    from test_mtp import build

    made = {}
    for name in MTP_SPLITS:
        path = tmp_path_factory.mktemp(name)
        build(path, 160, name == "mtp-moe", copying=True)
        save_tiny_tokenizer(path, 160)
        probe_alone(path, probe_mtp)
        made[name] = path
    return made


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_mtp_drafts_on_every_split(mtp_models, tmp_path, ranks):
    """Speculative decoding with the model's MTP head on a group: the head on rank 0 beside the embedding (pipeline),
    or split like the layers (tensor: heads and hidden units; experts: its routed experts), gives the single-process
    logits, answers and draft counts; and the drafted answers are the plain ones."""
    cases = [{"model": str(path), "parallel": mode, "out": str(tmp_path / f"{name}-{mode}"), "probe": "mtp"}
             for name, path in mtp_models.items() for mode in MTP_SPLITS[name]]
    run_group(cases, ranks, tmp_path)
    for name, path in mtp_models.items():
        single = json.loads((path / "single" / "result.json").read_text())
        assert [a[: len(b)] for a, b in zip(single["plain"], single["drafted_answers"], strict=True)] == \
            single["drafted_answers"], (name, single)
        # drafts taken on both; on the dense one some rolled back too (DeltaNet's checkpoint restored)
        assert 0 < single["accepted_drafts"] and (name == "mtp-moe" or single["accepted_drafts"] < single["drafted"])


# ---------------------------------------------------------------------------------------------- saved sessions
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
SESSION_SPLITS = {"chat-hybrid": ("pipeline", "tensor"), "chat-moe": ("experts",)}


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny hybrid (Qwen3.5: DeltaNet states resume only at checkpoints) and the tiny MoE, with a chat template,
    and what one process gives for a saved and resumed conversation."""
    made = {}
    for name, arch in (("chat-hybrid", "qwen3_5_text"), ("chat-moe", "qwen3_next")):
        path = tmp_path_factory.mktemp(name)
        make_hybrid(arch, path)
        save_tiny_tokenizer(path, 160)
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
        probe_alone(path, probe_session)
        made[name] = path
    return made


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_saved_session_resumes_on_a_group(chat_models, tmp_path, ranks):
    """Session.save / load on a split model: each rank writes and reads its own share. The resumed conversation's
    next turn is the uninterrupted one's (and one process's), token for token, running only what is new; a file
    from another model, a share corrupt, missing or from another save, or one that cannot be written, fails with
    one line on every rank (rank 0 raises it, the others log it), keeps no partial file, and the group goes on."""
    cases = [{"model": str(path), "parallel": mode, "out": str(tmp_path / f"{name}-{mode}"), "probe": "session"}
             for name, path in chat_models.items() for mode in SESSION_SPLITS[name]]
    outputs = run_group(cases, ranks, tmp_path)
    last = ranks - 1
    for case in cases:
        single = json.loads((Path(case["model"]) / "single" / "result.json").read_text())
        assert single["resumed"] == single["answers"][2] and single["resumed_cached"] > 0, single
        errors = json.loads((Path(case["out"]) / "errors.json").read_text())
        share = f"{case['out']}/%s.session.rank{last}"
        assert errors["foreign"].startswith("InvalidRequest: ") and "was saved from another model" in errors["foreign"]
        assert errors["corrupt"] == f"FormatError: rank {last}: {share % 'corrupt'}: is corrupt (its arrays do not " \
                                    "match their checksum)", errors
        assert errors["missing"] == f"InvalidRequest: rank {last}: {share % 'missing'}: no such file", errors
        assert errors["mixed"] == f"FormatError: rank {last}: its share of the saved cache is from another save " \
                                  "than rank 0's file", errors
        assert errors["blocked"].startswith(f"InvalidRequest: rank {last}: {share % 'blocked'}: cannot be written")
        assert errors["blocked_kept"] is False and errors["after"] is True, errors
        for kind in ("corrupt", "missing"):  # the rank whose share failed says so too
            assert f"{share % kind}" in outputs[last], outputs[last][-2000:]


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_the_prompt_cache_spills_alike_on_every_rank(chat_models, tmp_path, ranks):
    """A prompt cache spilling to disk on a split model: rank 0 decides (by its own share's sizes) which entries go
    to disk, which files are dropped and which come back; every other rank replays it on its own disk. The group
    resumes what one process resumes (cached tokens, answers; how many files it wrote may differ, by rank 0's
    sizes), and every rank keeps the same files."""
    model = chat_models["chat-hybrid"]
    single = tmp_path / "single"
    alone = mlxq.load(str(model))
    probe_spill(alone, single)
    alone.close()
    expected = json.loads((single / "result.json").read_text())
    assert expected["spill_reads"] > 0 and expected["spill_writes"] > expected["spilled_entries"] > 0, expected
    assert [r["cached"] > 0 for r in expected["runs"][5:]] == [True, False, False], expected  # (0, 2 dropped)
    cases = [{"model": str(model), "parallel": mode, "out": str(tmp_path / mode), "probe": "spill"}
             for mode in ("pipeline", "tensor")]
    run_group(cases, ranks, tmp_path, compare=False)
    for case in cases:
        got = json.loads((Path(case["out"]) / "result.json").read_text())
        assert got["runs"] == expected["runs"] and got["spill_reads"] == expected["spill_reads"], (case, got, expected)
        files = [json.loads((Path(case["out"]) / f"spill-{r}.json").read_text()) for r in range(ranks)]
        assert len(files[0]) == got["spilled_entries"] and all(f == files[0] for f in files), files


# ---------------------------------------------------------------------------------------------- streamed experts
@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Path]:
    """The tiny MoE (a dense layer among the MoE ones) and the tiny hybrid MoE (Qwen3.5 layout), 2-bit experts
    written to expert packs, and what one process gives with every expert resident (streamed is bit-identical to it
    in one process: test_experts.py)."""
    from test_experts import build, quantize

    made = {}
    for name in ("qwen3_moe", "qwen3_5_moe_text"):
        root = tmp_path_factory.mktemp(name)
        path = quantize(build(name, root / "src"), root / "packs", stream_experts=True)
        probe_alone(path)
        made[name] = path
    return made


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_each_rank_streams_its_own_experts_within_its_own_budget(packed, tmp_path, ranks):
    """Experts and pipeline splits of models with expert packs: each rank streams only the experts it holds, from
    the packs, within a budget of half of them (under the experts split, one budget per rank as Macs of different
    memory get: rank 0's three quarters, the others' half); the group gives what one process gives."""
    per_rank = ",".join(["75%"] + ["50%"] * (ranks - 1))
    cases = [{"model": str(path), "parallel": mode, "out": str(tmp_path / f"{name}-{mode}"),
              "expert_memory": per_rank if mode == "experts" else "50%",
              "expert_options": {"prefetch": 1} if mode == "experts" else None}  # decoding reads a layer ahead
             for name, path in packed.items() for mode in ("experts", "pipeline")]
    run_group(cases, ranks, tmp_path)
    for case in cases:
        config = text_config(json.loads((Path(case["model"]) / "config.json").read_text()))
        moe_layers = config["num_hidden_layers"] - len(config.get("mlp_only_layers") or [])
        n_experts = config.get("num_experts") or config["num_local_experts"]
        ranks_seen = json.loads((Path(case["out"]) / "status.json").read_text())["ranks"]
        # between them the ranks hold every expert once: a share of each layer's, or whole layers
        assert sum(r["experts_held"] for r in ranks_seen) == moe_layers * n_experts, ranks_seen
        for r in ranks_seen:
            if not r["experts_held"]:  # a pipeline stage of dense layers only
                assert case["parallel"] == "pipeline", r
                continue
            assert r["expert_slots"] < r["experts_held"], r  # its budget is below its share
            stats = json.loads((Path(case["out"]) / f"experts-{r['rank']}.json").read_text())
            assert stats["misses"] > 0 and stats["bytes_read"] > 0, (r, stats)  # and it read them from its packs
            if case["parallel"] == "experts":  # and read its own experts ahead while decoding, some of them used
                assert stats["prefetch_reads"] > 0 and stats["prefetch_hits"] > 0, (r, stats)
        # the group's counters, as `generate -v` and the API's timings show them: every rank's, gathered
        group = json.loads((Path(case["out"]) / "experts-group.json").read_text())
        ranks_stats = [json.loads(p.read_text()) for p in sorted(Path(case["out"]).glob("experts-[0-9]*.json"))]
        for key in ("hits", "misses", "reads", "bytes_read"):
            assert group[key] == sum(r[key] for r in ranks_stats), (key, group, ranks_stats)
        assert group["tokens"] == max(r["tokens"] for r in ranks_stats) > 0, group
        if case["parallel"] == "experts":  # each rank's own budget: a smaller pool for each expert held at 50 %
            per_expert = [r["expert_pool_bytes"] / r["experts_held"] for r in ranks_seen]
            assert all(p < per_expert[0] for p in per_expert[1:]), ranks_seen


# ---------------------------------------------------------------------------------------------- memory
def make_wide(path: Path, experts: int = 0, hidden: int = 384, layers: int = 8, intermediate: int = 2048) -> int:
    """A random float32 model whose weights (~90 MB) dwarf what a process needs besides; returns their bytes. A Llama,
    or with `experts` a Qwen3-MoE of that many experts (each of `intermediate` / 8 hidden units, stored one tensor
    per expert as Hugging Face checkpoints are), where the experts are nearly all the bytes. 12 heads over 6
    key/value heads: a tensor split of 2 or of 3 ranks keeps each query head with its key/value head."""
    import mlx.core as mx

    heads, head_dim = 12, 32
    kv = 6 * head_dim
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=
                  intermediate, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=6,
                  head_dim=head_dim, vocab_size=160, rms_norm_eps=1e-5, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    per_layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                 "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, heads * head_dim)}
    if experts:
        moe = intermediate // 8
        config.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=experts,
                      num_experts_per_tok=2, moe_intermediate_size=moe, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], rope_theta=1e6)
        per_layer.update({"self_attn.q_norm": (head_dim,), "self_attn.k_norm": (head_dim,),
                          "mlp.gate": (experts, hidden)})
        for e in range(experts):
            per_layer.update({f"mlp.experts.{e}.gate_proj": (moe, hidden), f"mlp.experts.{e}.up_proj": (moe, hidden),
                              f"mlp.experts.{e}.down_proj": (hidden, moe)})
    else:
        per_layer.update({"mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                          "mlp.down_proj": (hidden, intermediate)})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (160, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (160, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    mx.random.seed(0)
    weights = {k: 0.02 * mx.random.normal(s) if len(s) > 1 else mx.ones(s) for k, s in shapes.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    save_tiny_tokenizer(path, 160)
    return sum(v.nbytes for v in weights.values())


@pytest.mark.parametrize(("parallel", "ranks"), [
    ("pipeline", 2), ("tensor", 2), ("experts", 2), *(pytest.param(mode, 3, marks=pytest.mark.slow) for mode in (
        "pipeline", "tensor", "experts"))])
def test_each_rank_holds_only_its_share(tmp_path, parallel, ranks):
    """Measured in each rank's process: resident memory grows by about the bytes the rank holds (+ 15 % + 24 MB:
    the interpreter's own growth, MLX's buffers, one tensor being read), and what it holds is about 1/ranks of the
    model, never the whole of it. The experts split runs on a MoE model whose experts are nearly all its bytes."""
    total = make_wide(tmp_path / "wide", experts=16 if parallel == "experts" else 0)
    out = tmp_path / "out"
    run_group([{"model": str(tmp_path / "wide"), "parallel": parallel, "out": str(out), "probe": False}], ranks,
              tmp_path, compare=False)
    shares = json.loads((out / "status.json").read_text())["ranks"]
    held = [r["weights_bytes"] for r in shares]
    assert all(abs(h / total - 1 / ranks) < 0.15 for h in held), (held, total)
    for r in shares:
        grown = r["peak_rss_bytes"] - r["rss_before_bytes"]
        assert grown < r["weights_bytes"] * 1.15 + (24 << 20), (r, total)  # its share, plus the margin
        assert grown < (1 / ranks + 0.25) * total, (r, total)  # and never the whole model


@pytest.mark.slow  # a 600 MB model quantized, then served by 2 ranks (with 3, a rank's share of its experts would
# be too small to tell from the margin)
@pytest.mark.parametrize(("parallel", "ranks"), [("experts", 2), ("pipeline", 2)])
def test_a_streaming_rank_holds_its_share_and_its_budget(tmp_path, parallel, ranks):
    """Each rank streams its experts from packs within a budget of a tenth of the experts it holds: measured in the
    rank's process after generating (the probe's requests), its peak resident memory has grown since it began
    loading by at most what it holds resident, plus its expert pool, plus MLX's transient buffers at their peak
    (MLX's peak minus the weights and the pool, about 16 MB here) or its buffer cache if that is larger, plus
    10 % + 32 MB (the engine's threads, reads in flight), which is below what holding all of its experts would
    take. The transient peak counts because the pool holds MLX's cache to 1/16 of its budget: buffers MLX frees
    go back to malloc, whose heap keeps their pages. The experts are 8-bit, about 160 MB of them."""
    from mlxq.quant import pipeline
    from mlxq.quant.recipes import Recipe

    make_wide(tmp_path / "wide", experts=64)
    model = tmp_path / "packs"
    pipeline.quantize(str(tmp_path / "wide"), model, Recipe("experts-8bit", 8), progress=False, stream_experts=True)
    out = tmp_path / "out"
    run_group([{"model": str(model), "parallel": parallel, "out": str(out), "expert_memory": "10%"}], ranks,
              tmp_path, compare=False)
    shares = json.loads((out / "status.json").read_text())["ranks"]
    for r in shares:
        measured = json.loads((out / f"rss-{r['rank']}.json").read_text())
        grown, pool = measured["peak_rss_bytes"] - r["rss_before_bytes"], r["expert_pool_bytes"]
        held = pool * r["experts_held"] / r["expert_slots"]  # all of its experts, had it kept them
        assert r["expert_slots"] < r["experts_held"] / 6, r  # a tenth (rounded up per layer)
        transient = max(measured["mlx_cache_bytes"], measured["mlx_peak_bytes"] - r["weights_bytes"] - pool)
        bound = (r["weights_bytes"] + pool) * 1.10 + transient + (32 << 20)
        assert grown < bound < r["weights_bytes"] + held, (grown, bound, held, measured, r)


# ---------------------------------------------------------------------------------------------- failures
def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of `body`."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def serve_group(models, tmp_path):
    """`mlxq serve MODEL --hosts HOSTS` over three local ranks; yields (base url, process) once healthy; ends every
    process of the group afterwards."""
    started = []

    def start(parallel: str, *extra: str):
        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 3))
        port = free_port()
        log = open(tmp_path / "serve.log", "w")
        ring_port = free_loopback_ports(3)
        proc = subprocess.Popen([PYTHON, "-m", "mlxq.cli", "serve", str(models["dense"]), "--hosts", str(hosts),
                                 "--parallel", parallel, "--port", str(port), "--ring-port", str(ring_port),
                                 "--log-level", "warning", *extra], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline, body = time.monotonic() + 300, None
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                code, body = http(url + "/health")
                if code == 200:
                    break
            except (urllib.error.URLError, ConnectionError) as e:  # not listening yet
                body = repr(e)
            if time.monotonic() > deadline:  # where it is stuck: faulthandler prints every thread on SIGABRT
                proc.send_signal(signal.SIGABRT)
                proc.wait(30)
                pytest.fail(f"the group did not come up: {body}\n{(tmp_path / 'serve.log').read_text()[-6000:]}")
            time.sleep(0.5)
        return url, proc, body

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stream_until_error(url: str, model: str, hit) -> tuple[int, str | None]:
    """Streams a long completion; calls `hit()` after a few tokens; returns (tokens seen, the error message)."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    tokens, error = 0, None
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                break
            tokens += 1
            if tokens == 5:
                hit()
    return tokens, error


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_rank_fails_the_request_and_health_says_degraded(serve_group, how):
    url, proc, health = serve_group("pipeline", "--rank-timeout", "10")
    pids = {r["rank"]: r["pid"] for r in health["group"]["ranks"]}
    assert health["group"]["state"] == "ok" and len(pids) == 3
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    t0 = time.monotonic()
    tokens, error = stream_until_error(url, health["model"], lambda: os.kill(pids[1], sig))
    assert error is not None and "degraded" in error, (tokens, error)
    assert tokens < 480 and time.monotonic() - t0 < 90  # ended by the failure, not by running out
    code, body = http(url + "/health")
    assert code == 503 and body["status"] == "degraded", body
    assert "rank 1" in body["group"]["error"] or "step failed" in body["group"]["error"], body
    code, answer = http(url + "/v1/completions", {"model": health["model"], "prompt": "hi", "max_tokens": 3})
    assert code == 503 and "degraded" in answer["error"]["message"], answer
    deadline = time.monotonic() + 30  # the rank left standing was told to leave
    while alive(pids[2]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pids[2])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while alive(pids[1]) and time.monotonic() < deadline:  # a frozen rank is ended by rank 0 on its way out
        time.sleep(0.2)
    assert not alive(pids[1])
