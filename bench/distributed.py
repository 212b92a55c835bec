"""A model split over a group of processes (`mlxq.distributed`) on MLX's ring backend, local ranks on this machine:
per generated token, the bytes the ranks send each other and the time that communication takes, for each split
(pipeline, tensor, experts) of a dense, a hybrid (Qwen3.5 layout) and a MoE (Qwen3-Next layout) model; the
decode time per token of each split beside the same model in one process (SmolLM2's real weights for the pipeline
overhead); and, from the measured collectives, a projection of decode tok/s for Qwen3.5-397B-A17B on two and four
64 GB Macs over Thunderbolt 5, beside flash-moe's single-Mac figure.

The experts split's MoE blocks combine by all_sum or by all_gather of only the rows each rank computed
(`ExpertShard`): both are measured, forced, beside the automatic choice, for decode steps and for the prompt's
prefill pass, per token; and the bytes both ways for Qwen3.5-397B's routing (`combine_bytes`).

    python bench/distributed.py [--quick] [--ranks 2]

How it measures, on every rank (`--rank-worker`, started by `mlx.launch --backend ring`):
- bytes: every `mx.distributed` send / recv / all_sum issued inside a decode step (`Runner.decode`) is recorded
  with its size; per token = their sum over the decode steps / the steps (one row, so one token a step). "wire"
  bytes count an all_sum as the ring algorithm moves it (2 (n-1) / n of its payload out of each rank);
- the same for the prompt's prefill pass, per prompt token;
- communication time: the collectives of one decode step (and of the prefill pass, per token), replayed alone on
  the same ring in the same order (every rank at once), timed over many tokens' worth: what the step would cost
  with no compute at all;
- decode time: `timings.decode_tps` of a greedy generation (prompt cache off), median of interleaved runs, the same
  figure as the one-process model's in the parent, measured just before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import median, parse_args, write_result  # noqa: E402

CACHE = Path.home() / ".cache" / "mlxq" / "bench-distributed"
PROMPT = [(7 * i + 3) % 150 + 5 for i in range(24)]

# Random models at a size where a step's compute is not all overhead; transformers builds them (its own init).
_ATTN = dict(vocab_size=160, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=64,
             max_position_embeddings=1024)
_DELTA = dict(linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4,
              linear_num_value_heads=8)
MODELS = {
    "dense": ("LlamaConfig", "LlamaForCausalLM", dict(_ATTN, num_key_value_heads=4, intermediate_size=1536)),
    "hybrid": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(_ATTN, **_DELTA, num_key_value_heads=2,
                                                                 intermediate_size=1536, tie_word_embeddings=True)),
    "moe": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(_ATTN, **_DELTA, num_key_value_heads=2,
                                                            intermediate_size=1536, num_experts=16,
                                                            num_experts_per_tok=4, moe_intermediate_size=256,
                                                            shared_expert_intermediate_size=256)),
}
# "experts" combines each MoE block as `ExpertShard` decides (auto); "experts/sum" and "experts/gather" force one way
SPLITS = {"dense": ("pipeline", "tensor"), "hybrid": ("pipeline", "tensor"),
          "moe": ("pipeline", "tensor", "experts", "experts/sum", "experts/gather"), "smollm2": ("pipeline",)}
QUICK = {"dense": ("pipeline",), "moe": ("tensor", "experts/sum", "experts/gather")}  # each split, each combine

# ---------------------------------------------------------------------------------------------- projection
# Qwen3.5-397B-A17B's shape (mlxq.bench.synthetic, as published): 60 layers, 3 Gated DeltaNet to 1 gated attention, a
# MoE block in every layer; flash-moe's measured single-Mac figure (bench/experts.py).
# What the projection assumes (stated, not measured here).
ASSUME = {
    "link": "Thunderbolt 5, 80 Gb/s per direction; 10 GB/s taken as usable by the ring's TCP",
    "link_bytes_per_s": 10e9,
    "link_latency_s": 50e-6,  # one message hop Mac to Mac over Thunderbolt TCP (MLX ring), per collective step
    "mac": "64 GB Apple Silicon Mac with Thunderbolt 5 (M4 Pro: 273 GB/s memory bandwidth)",
    "memory_bytes_per_s": 273e9 * 0.6,  # a decode step reads its weights at ~60% of peak bandwidth
    "ssd_bytes_per_s": 6e9,  # a Mac SSD (DESIGN: 5-7 GB/s)
    "weights_budget_bytes": 52e9,  # of 64 GB: the rest for macOS, KV caches and activations
    "expert_bits": 2.5,  # 2-bit experts with a scale and bias per 64 weights (flash-moe's experts)
    "dense_bits": 4.5,  # 4-bit non-expert weights, scale and bias per 64
    "activation_bytes": 2,  # float16 on Metal
    "experts_per_tok": 4,  # flash-moe's setting (the model's own is 10; both are reported)
}
def params_397b(q) -> dict[str, float]:
    """Parameter counts of Qwen3.5-397B-A17B from its shape (projections only; norms are negligible)."""
    d, h = q.hidden, q.head_dim
    attention = d * (2 * q.heads * h) + 2 * d * q.kv_heads * h + q.heads * h * d  # gated q, k, v, o
    key, value = q.linear_key_heads * q.linear_head_dim, q.linear_value_heads * q.linear_head_dim
    delta = d * (2 * key + value) + d * value + 2 * d * q.linear_value_heads + value * d  # qkv, z, b and a, out
    shared = 3 * d * q.shared_hidden + d + d * q.experts  # shared expert, its gate, the router
    mixers = q.layers // 4 * attention + (q.layers - q.layers // 4) * delta
    return {"expert": q.expert_params(), "experts_total": q.expert_params() * q.experts * q.layers,
            "dense_per_token": mixers + q.layers * shared + q.vocab * d,  # the head; one embedding row
            "dense_total": mixers + q.layers * shared + 2 * q.vocab * d}


def project(measured: dict[str, dict], ranks_list=(1, 2, 4), experts_per_tok: int | None = None) -> dict:
    """Decode tok/s of Qwen3.5-397B-A17B split over n Macs: the weights a rank reads per token at the memory's
    bandwidth (experts that do not fit its budget from SSD), plus the communication the measured splits issue per
    layer, scaled to the model's hidden size and sent over the assumed link. n = 1: one Mac alone, the same
    assumptions (to set beside flash-moe's measured figure)."""
    from experts import FLASH_MOE

    from mlxq.bench.synthetic import QWEN35_397B as c

    a = ASSUME
    k = experts_per_tok or a["experts_per_tok"]
    p = params_397b(c)
    expert_b, dense_b = a["expert_bits"] / 8, a["dense_bits"] / 8
    experts_bytes, dense_bytes = p["experts_total"] * expert_b, p["dense_total"] * dense_b
    read_dense, read_experts = p["dense_per_token"] * dense_b, k * c.layers * p["expert"] * expert_b
    out = {"model": asdict(c), "params": p, "experts_per_tok": k, "weights_bytes": experts_bytes + dense_bytes,
           "read_per_token_bytes": read_dense + read_experts}
    for n in ranks_list:
        for mode, m in (measured.items() if n > 1 else [("one_mac", {})]):
            # what a rank holds and reads per token
            if mode in ("pipeline", "one_mac"):
                hold_dense, hold_experts, dense_read, experts_read = dense_bytes / n, experts_bytes / n, \
                    read_dense, read_experts  # one token crosses every stage in turn: the reads add up
            elif mode == "tensor":
                hold_dense, hold_experts, dense_read, experts_read = dense_bytes / n, experts_bytes / n, \
                    read_dense / n, read_experts / n
            else:  # experts: dense replicated, experts shared (routing spread evenly)
                hold_dense, hold_experts, dense_read, experts_read = dense_bytes, experts_bytes / n, \
                    read_dense, read_experts / n
            resident = max(0.0, min(1.0, (a["weights_budget_bytes"] - hold_dense) / hold_experts))
            compute_s = (dense_read + experts_read * resident) / a["memory_bytes_per_s"]
            ssd_s = experts_read * (1 - resident) / a["ssd_bytes_per_s"]
            # communication, at this hidden size over the assumed link: pipeline hands the hidden state on once per
            # stage (the last back to rank 0); the others all_sum as often per layer as measured, each a ring of
            # 2 (n - 1) hops moving 2 (n - 1) / n of its payload out of each rank
            if mode == "one_mac":
                hops, wire = 0, 0
            elif mode == "pipeline":
                hops, wire = n, n * c.hidden * a["activation_bytes"]
            else:
                calls = m["collectives_per_layer"] * c.layers
                hops = calls * 2 * (n - 1)  # (a decode step's experts split combines by all_sum too: ExpertShard)
                units = m["payload_units_per_layer"] * c.layers  # hidden-sized vectors summed per token
                wire = units * c.hidden * a["activation_bytes"] * 2 * (n - 1) / n
            comm_s = hops * a["link_latency_s"] + wire / a["link_bytes_per_s"]
            step = compute_s + ssd_s + comm_s
            out[mode if n == 1 else f"{mode}_x{n}"] = {"experts_resident": round(resident, 3),
                                   "compute_ms": 1e3 * compute_s, "ssd_ms": 1e3 * ssd_s, "comm_ms": 1e3 * comm_s,
                                   "comm_messages": hops, "comm_bytes": wire, "tok_s": 1 / step,
                                   "vs_flash_moe": (1 / step) / min(FLASH_MOE["tok_s"])}
    return out


def combine_bytes(ranks_list=(2, 3, 4), experts_per_tok=(4, 10)) -> dict:
    """The experts split's combine for Qwen3.5-397B-A17B (512 experts, hidden 4096, float16), in bytes sent out of
    each rank per token of a long prompt, both ways: all_sum 2 (n - 1) / n rows; all_gather (n - 1) m / tokens rows,
    m the most tokens any rank computed, which for routing spread evenly is tokens x P(a token uses one of a rank's
    E / n experts) = 1 - C(E - E / n, k) / C(E, k). A decode step (one token, m = 1) is the same formula at
    P = 1."""
    from mlxq.bench.synthetic import QWEN35_397B as c

    row = c.hidden * ASSUME["activation_bytes"]
    out = {}
    for n in ranks_list:
        for k in experts_per_tok:
            touch = 1 - math.comb(c.experts - c.experts // n, k) / math.comb(c.experts, k)
            sums, gathers = 2 * (n - 1) / n * row, (n - 1) * touch * row
            out[f"x{n}_k{k}"] = {"p_rank_used": round(touch, 4), "all_sum_bytes": sums, "all_gather_bytes": gathers,
                                 "prefill_takes": "gather" if n * touch < 2 else "sum", "decode_takes": "sum",
                                 "decode_all_sum_bytes": sums, "decode_all_gather_bytes": (n - 1) * row}
    return out


# ---------------------------------------------------------------------------------------------- models
def make_models() -> dict[str, str]:
    """The random bench models (built once, cached), with a small byte-level tokenizer; and SmolLM2."""
    import torch
    import transformers

    from mlxq.bench.synthetic import bpe_tokenizer

    paths = {}
    for name, (cfg_cls, model_cls, kwargs) in MODELS.items():
        path = CACHE / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
            tmp = Path(tempfile.mkdtemp(dir=CACHE.parent, prefix=f".{name}-"))
            model.save_pretrained(tmp)
            bpe_tokenizer(tmp, kwargs["vocab_size"])
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        paths[name] = str(path)
    paths["smollm2"] = "smollm2"
    return paths


def decode_ms(model, tokens: int) -> float:
    """ms per decoded token of one greedy generation (the first token, the prefill's, not counted)."""
    r = model.generate(PROMPT, max_tokens=tokens, ignore_eos=True)
    return 1e3 / r.timings.decode_tps


# ---------------------------------------------------------------------------------------------- one rank
class Recorder:
    """Every collective issued while a decode step or a prefill pass builds its graph: (op, shape, dtype, peer), per
    step, with the tokens the step fed."""

    OPS = ("send", "recv", "all_sum", "all_gather")

    def __init__(self):
        import mlx.core as mx

        from mlxq.engine.runner import Runner

        self.steps: dict[str, list[tuple[int, list[tuple]]]] = {"decode": [], "prefill": []}
        self._phase = None
        dist = mx.distributed
        for op in self.OPS:
            setattr(dist, op, self._wrap(op, getattr(dist, op)))
        for phase, count in (("decode", len), ("prefill", lambda tokens: sum(len(t) for t in tokens))):
            setattr(Runner, phase, self._recorded(phase, getattr(Runner, phase), count))

    def _recorded(self, phase, fn, count):
        def call(runner, tokens, *args):
            self.steps[phase].append((count(tokens), []))
            self._phase = phase
            try:
                return fn(runner, tokens, *args)
            finally:
                self._phase = None

        return call

    def _wrap(self, op, fn):
        def call(*args, **kw):
            if self._phase:
                if op == "recv":
                    shape, dtype, peer = args[0], args[1], args[2]
                else:
                    shape, dtype, peer = tuple(args[0].shape), args[0].dtype, (args[1] if op == "send" else None)
                self.steps[self._phase][-1][1].append((op, tuple(shape), dtype, peer))
            return fn(*args, **kw)

        return call

    def clear(self) -> None:
        for steps in self.steps.values():
            steps.clear()

    def figures(self, size: int, phase: str = "decode") -> dict:
        """Per token fed (a decode step is one token; a prefill pass its prompt tokens): messages by op; payload and
        ring wire bytes sent by this rank. A ring all_sum sends 2 (n-1) / n of its payload out of each rank, a ring
        all_gather (n-1) times its (per-rank) payload."""
        steps = [s for s in self.steps[phase] if s[1]] or [(1, [])]
        count, payload, wire = {}, 0, 0.0
        for _, step in steps:
            for op, shape, dtype, _ in step:
                nbytes = math.prod(shape) * dtype.size
                count[op] = count.get(op, 0) + 1
                payload += nbytes if op != "recv" else 0
                wire += {"send": nbytes, "recv": 0, "all_sum": nbytes * 2 * (size - 1) / size,
                         "all_gather": nbytes * (size - 1)}[op]
        n = sum(tokens for tokens, _ in steps)
        return {"steps": len(steps), "tokens": n, "per_token": {op: c / n for op, c in count.items()},
                "payload_bytes_per_token": payload / n, "wire_bytes_per_token": wire / n}


def replay(group, step: list[tuple], tokens: int) -> float:
    """Seconds per token of one decode step's collectives alone, in the order they were issued, every rank at once."""
    import mlx.core as mx

    arrays = {(shape, dtype): mx.zeros(shape, dtype) for _, shape, dtype, _ in step}
    mx.eval(list(arrays.values()))

    def one():
        for op, shape, dtype, peer in step:
            if op == "send":
                mx.eval(mx.distributed.send(arrays[shape, dtype], peer, group=group))
            elif op == "recv":
                mx.eval(mx.distributed.recv(shape, dtype, peer, group=group))
            elif op == "all_gather":
                mx.eval(mx.distributed.all_gather(arrays[shape, dtype], group=group))
            else:
                mx.eval(mx.distributed.all_sum(arrays[shape, dtype], group=group))

    for _ in range(3):
        one()
    mx.eval(mx.distributed.all_sum(mx.zeros(1), group=group))  # every rank starts the timing together
    t0 = time.perf_counter()
    for _ in range(tokens):
        one()
    return (time.perf_counter() - t0) / tokens


def rank_worker(plan_path: str) -> None:
    import mlx.core as mx

    import mlxq
    from mlxq.distributed.split import set_expert_combine

    plan = json.loads(Path(plan_path).read_text())
    group = mx.distributed.init(backend="ring", strict=True)
    rank, size = group.rank(), group.size()
    recorder = Recorder()
    for case in plan["cases"]:
        recorder.clear()
        model = mlxq.load(case["model"], group=group, parallel=case["parallel"])
        set_expert_combine(model.net, case.get("combine", "auto"))
        out = Path(case["out"])
        if rank == 0:
            model.configure(prompt_cache_bytes=0)
            decode_ms(model, 4)  # warm-up
            ms = [decode_ms(model, plan["tokens"]) for _ in range(plan["runs"])]
            status = model.status()
            model.shutdown()
            out.mkdir(parents=True, exist_ok=True)
            (out / "decode.json").write_text(json.dumps({"decode_ms": ms, "status": status}))
        else:
            model.follow()
        figures = recorder.figures(size)
        figures["prefill"] = recorder.figures(size, "prefill")
        del model
        mx.eval(mx.distributed.all_sum(mx.zeros(1), group=group))  # every rank done with the model
        step = recorder.steps["decode"][-1][1] if recorder.steps["decode"] else []
        figures["comm_ms_per_token"] = 1e3 * replay(group, step, plan["replay_tokens"])
        prompt = [s for s in recorder.steps["prefill"] if s[1]]
        if prompt:  # the longest prefill pass's collectives, per token it fed
            tokens, step_p = max(prompt, key=lambda s: s[0])
            figures["prefill"]["comm_ms_per_token"] = 1e3 * replay(group, step_p, plan["replay_tokens"]) / tokens
        figures["step"] = [[op, list(shape), str(dtype), peer] for op, shape, dtype, peer in step]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(figures))


# ---------------------------------------------------------------------------------------------- the run
def rank_blas_threads(ranks: int) -> int:
    """The ranks share this machine's cores: BLAS threads split between them (OpenBLAS's idle threads spin, and so
    does a rank waiting on the ring, so more threads than cores starve the rank that computes)."""
    return max(1, (os.cpu_count() or 1) // ranks)


def run_group(cases: list[dict], ranks: int, **settings) -> list[tuple[dict, list[dict]]]:
    """Runs `cases` on a ring of `ranks` local processes (`mlx.launch`); per case, rank 0's decode figures and
    every rank's collectives."""
    from mlxq.distributed.launch import free_loopback_ports

    with tempfile.TemporaryDirectory(prefix="mlxq-bench-distributed-") as work:
        plan = Path(work) / "plan.json"
        cases = [{**case, "out": str(Path(work) / case["key"])} for case in cases]
        plan.write_text(json.dumps({"cases": cases, **settings}))
        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(ranks), "--backend", "ring",
               "--starting-port", str(free_loopback_ports(ranks)), "--python", sys.executable, __file__,
               "--rank-worker", str(plan)]
        blas = str(rank_blas_threads(ranks))
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=1800,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": blas, "OMP_NUM_THREADS": blas})
        if done.returncode:
            raise SystemExit(f"bench/distributed: the group exited {done.returncode}")
        return [(json.loads((Path(c["out"]) / "decode.json").read_text()),
                 [json.loads((Path(c["out"]) / f"rank{r}.json").read_text()) for r in range(ranks)]) for c in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--cases", default=None, help="MODEL:SPLIT,... (default: every split of every model; --quick: "
                    "the dense pipeline, the MoE tensor and experts splits)")
    ap.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    args = parse_args(ap)
    if args.rank_worker:
        return rank_worker(args.rank_worker)
    tokens, runs = args.tokens or (8 if args.quick else 32), args.runs or (1 if args.quick else 3)
    splits = QUICK if args.quick else SPLITS
    if args.cases:
        splits = {}
        for case in args.cases.split(","):
            name, mode = case.split(":")
            splits[name] = splits.get(name, ()) + (mode,)

    import mlxq

    paths = {name: path for name, path in make_models().items() if name in splits}
    single = {}
    for name, path in paths.items():  # the same figure, one process
        model = mlxq.load(path)
        model.configure(prompt_cache_bytes=0)
        decode_ms(model, 4)
        single[name] = [decode_ms(model, tokens) for _ in range(runs)]
        model.close()
        del model
    cases = [{"name": name, "model": path, "parallel": mode.split("/")[0], "combine": mode.partition("/")[2] or "auto",
              "key": f"{name}_{mode.replace('/', '_')}"} for name, path in paths.items() for mode in splits[name]]
    t0 = time.perf_counter()
    outputs = run_group(cases, args.ranks, tokens=tokens, runs=runs, replay_tokens=20 if args.quick else 100)
    group_s = time.perf_counter() - t0

    results, per_layer = {}, {}
    for case, (decode, ranks) in zip(cases, outputs, strict=True):
        name, mode = case["name"], case["parallel"]
        split_ms, one_ms = median(decode["decode_ms"]), median(single[name])
        layers = MODELS[name][2]["num_hidden_layers"] if name in MODELS else None
        prefill = {key: (sum(r["prefill"].get(key, 0) for r in ranks) if key.endswith("bytes_per_token") else
                         max(r["prefill"].get(key, 0) for r in ranks))
                   for key in ("payload_bytes_per_token", "wire_bytes_per_token", "comm_ms_per_token")}
        results[case["key"]] = {
            "combine": case["combine"] if mode == "experts" else None,
            "prefill": {**prefill, "messages_per_token": ranks[0]["prefill"]["per_token"]},
            "decode_ms_per_token": split_ms, "single_process_ms_per_token": one_ms,
            "overhead_ms_per_token": split_ms - one_ms, "split_vs_single": split_ms / one_ms,
            "payload_bytes_per_token": sum(r["payload_bytes_per_token"] for r in ranks),
            "wire_bytes_per_token": sum(r["wire_bytes_per_token"] for r in ranks),
            "messages_per_token": ranks[0]["per_token"],
            "comm_ms_per_token": max(r["comm_ms_per_token"] for r in ranks),
            # (each rank's peak memory is in tests/test_distributed.py: here one process loads every case in turn)
            "ranks": [{k: v for k, v in r.items() if k != "step"} | {"share": s["share"], "weights_bytes":
                       s["weights_bytes"]} for r, s in zip(ranks, decode["status"]["ranks"], strict=True)],
        }
        if name == "moe" and case["combine"] in ("auto", "sum"):  # the layout the projection scales: mixer + MoE
            hidden = MODELS[name][2]["hidden_size"]  # block in every layer; the sum's payload (rows combined)
            calls = sum(ranks[0]["per_token"].get(op, 0) for op in ("all_sum", "all_gather"))
            per_layer[mode] = {"collectives_per_layer": calls / layers,
                               "payload_units_per_layer": ranks[0]["payload_bytes_per_token"] / 4 / hidden / layers}
    per_layer["pipeline"] = {}  # one hand-over per stage, whatever the model
    from experts import FLASH_MOE

    projection = {"assumptions": ASSUME, "flash_moe": FLASH_MOE,
                  "k4": project(per_layer), "k10": project(per_layer, experts_per_tok=10),
                  "experts_combine_bytes_per_token": combine_bytes()}
    pipe = results.get("smollm2_pipeline") or next((v for k, v in results.items() if k.endswith("_pipeline")),
                                                   {"overhead_ms_per_token": None, "split_vs_single": None})
    write_result("distributed", {
        "quick": args.quick, "ranks": args.ranks, "rank_blas_threads": rank_blas_threads(args.ranks),
        "tokens": tokens, "runs": runs, "group_wall_s": group_s,
        "load_avg": os.getloadavg(), "splits": results, "single_process_ms": single,
        "pipeline_overhead_ms_per_token": pipe["overhead_ms_per_token"],
        "pipeline_vs_single": pipe["split_vs_single"], "projection_397b": projection})


if __name__ == "__main__":
    main()
