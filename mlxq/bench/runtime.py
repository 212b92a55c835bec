"""Prefill and decode speed, time to first token and peak memory of mlxq, and of a peer on the same stored weights
in the same run: mlx-lm on the same mlx-lm directory, llama.cpp (through llama-cpp-python) on the same GGUF.

Every side greedily generates exactly `gen` tokens after the same `prompt` token ids (end-of-sequence does not stop
it) in its own loop: mlxq's one engine (`Model.stream`, its prompt cache off), mlx-lm's `generate_step`,
llama-cpp-python's `Llama.generate`; all are timed alike: time to first token (TTFT) from the call to the first
token, prefill rate = prompt tokens / TTFT, decode rate = (gen - 1) / time from the first to the last token. A warm-up
run per side comes first (first-call allocations, compiles), then the timed runs alternate between the sides, so load
from elsewhere on a shared machine hits them alike; medians are reported. mlx-lm computes in mlxq's dtype (its copy
is cast), so both do the same arithmetic.

Memory: the growth of the process's peak resident set while a side loads and runs its warm-up (Linux, where the
high-water mark can be reset; each side loads with the earlier ones still resident, so nothing it reuses was
freed), and for MLX sides MLX's own peak allocation over the same span.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxq.bench.record import median
from mlxq.errors import InvalidRequest

PEERS = ("mlx-lm", "llama.cpp")
RATES = ("greedy, exactly the generated tokens asked for (end-of-sequence does not stop), no detokenization; "
         "TTFT: from the call to the first generated token; prefill: prompt tokens / TTFT; decode: (generated - 1) "
         "/ time from the first to the last generated token")
TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "knowledge spread across Europe. Before it, books were copied by hand, slowly and at great cost. "
)


@dataclass
class Side:
    """One runtime under test: `generate(prompt ids, n)` yields n greedy token ids."""

    name: str
    generate: Callable[[list[int], int], Iterator[int]]
    about: str  # what it runs: weights, dtype, threads
    peak_rss_gb: float | None = None
    mlx_peak_gb: float | None = None
    runs: list[dict] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # what the warm-up generated
    stable: bool = True  # every timed run generated the warm-up's tokens (greedy decoding is deterministic)

    def medians(self) -> dict:
        return {k: median(r[k] for r in self.runs) for k in ("ttft_s", "prefill_tps", "decode_tps")}


def timed(tokens: Iterable[int], prompt_tokens: int) -> tuple[list[int], dict]:
    """Drains a generate loop; (tokens, {ttft_s, prefill_tps, decode_tps}) under the definitions above."""
    start = time.perf_counter()
    out, first = [], None
    for token in tokens:
        out.append(int(token))
        if first is None:
            first = time.perf_counter()
    last = time.perf_counter()
    if first is None:
        raise InvalidRequest("the model generated no tokens")
    ttft = first - start
    decode = (len(out) - 1) / (last - first) if len(out) > 1 and last > first else 0.0
    return out, {"ttft_s": ttft, "prefill_tps": prompt_tokens / ttft, "decode_tps": decode}


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of English prose."""
    copies = 1
    while len(ids := tokenizer.encode(TEXT * copies)) < n:
        copies *= 2
    return ids[:n]


# ---------------------------------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak resident-set growth (Linux: VmHWM after resetting it through /proc/self/clear_refs) and the growth of
    MLX's peak allocation over a span of work (arrays held from before the span do not count)."""

    def __enter__(self) -> PeakMemory:
        mx.clear_cache()
        self.rss_before = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the high-water mark to the current resident set
            self.resettable = True
        except OSError:
            self.resettable = False
        mx.reset_peak_memory()
        self.mlx_before = mx.get_active_memory()  # what earlier sides hold: not this span's
        return self

    def __exit__(self, *exc) -> None:
        self.mlx_gb = (mx.get_peak_memory() - self.mlx_before) / 1e9
        hwm = _status_kb("VmHWM")
        self.rss_gb = (hwm - self.rss_before) * 1024 / 1e9 if self.resettable and hwm and self.rss_before else None


# ---------------------------------------------------------------------------------------------- the sides
def mlxq_side(name: str, **load_options) -> tuple[Side, object]:
    """mlxq on `name` through `mlxq.load` (as a user runs it); also returns the loaded model."""
    import mlxq

    model = mlxq.load(name, **load_options)
    model.configure(prompt_cache_bytes=0)  # every run prefills the whole prompt, as the peers do

    def generate(ids: list[int], n: int) -> Iterator[int]:
        return (t for chunk in model.stream(ids, max_tokens=n, ignore_eos=True) for t in chunk.tokens)

    dtype = _compute_dtype(model.net)
    quant = "quantized layers" if model.checkpoint.quantization else "float weights"
    return Side("mlxq", generate, f"{model.checkpoint.format}, {quant}, {dtype}"), model


def _compute_dtype(net) -> mx.Dtype:
    return net.model.norm.weight.dtype


def mlx_lm_side(path: str, dtype: mx.Dtype) -> Side:
    """mlx-lm's own loader and loop on the same directory, cast to `dtype`."""
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm.load(str(Path(path).expanduser()))
    model.set_dtype(dtype)

    def generate(ids: list[int], n: int) -> Iterator[int]:
        return (int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n))

    return Side("mlx-lm", generate, f"mlx_lm.load, cast to {dtype}")


def llama_cpp_side(path: str, context: int, threads: int | None = None) -> Side:
    """llama.cpp through llama-cpp-python on the same GGUF, all layers offloaded when Metal is there. `threads` for
    both decode and prompt; None keeps llama-cpp-python's defaults (half the cores decode, all of them prefill). Its
    thread pool spins while it waits, so on a machine busy with other work more threads can be far slower."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise InvalidRequest("--vs llama.cpp needs llama-cpp-python (pip install 'mlxq[dev]')") from None
    llm = Llama(model_path=str(Path(path).expanduser()), n_ctx=context, n_batch=512, n_threads=threads,
                n_threads_batch=threads, n_gpu_layers=-1 if mx.metal.is_available() else 0, verbose=False)

    def generate(ids: list[int], n: int) -> Iterator[int]:
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        return itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), n)

    return Side("llama.cpp", generate,
                f"llama-cpp-python, {llm.n_threads} decode / {llm.n_threads_batch} prompt threads")


# ---------------------------------------------------------------------------------------------- the run
def check_peer(model: str, vs: str | None) -> None:
    """The peer can run these very weights: mlx-lm loads directories, llama.cpp GGUF files."""
    if vs is None:
        return
    p = Path(model).expanduser()
    if vs == "mlx-lm" and not (p / "config.json").is_file():
        raise InvalidRequest(f"--vs mlx-lm: {model} is not an mlx-lm or HF directory (mlx-lm loads those only; "
                             "`mlxq quantize MODEL -o DIR` makes one)")
    if vs == "llama.cpp" and (p.suffix.lower() != ".gguf" or not p.is_file()):
        raise InvalidRequest(f"--vs llama.cpp: {model} is not a GGUF file (llama.cpp runs GGUF only)")
    if vs not in PEERS:
        raise InvalidRequest(f"--vs {vs}: expected one of {', '.join(PEERS)}")


def run(model: str, vs: str | None = None, prompt_tokens: int = 512, gen_tokens: int = 128, runs: int = 3,
        load: dict | None = None, progress: Callable[[str], None] | None = None,
        peer_threads: int | None = None) -> dict:
    """Benchmarks mlxq on `model` (`load`: options for `mlxq.load`, such as expert_memory) and the peer `vs` on the
    same weights (`peer_threads`: llama.cpp's); a JSON-able dict with the raw runs, medians, memory, expert-stream
    statistics when the experts stream, and `ratios` (mlxq / peer: above 1 is better for rates, below 1 for time
    and memory)."""
    check_peer(model, vs)
    if prompt_tokens < 1 or gen_tokens < 2 or runs < 1:
        raise InvalidRequest("need at least 1 prompt token, 2 generated tokens and 1 run")
    say = progress or (lambda _: None)
    import mlxq.api  # noqa: F401  (imports happen before the memory spans: they are not the model's memory)

    if vs == "mlx-lm":
        import mlx_lm.generate  # noqa: F401
    sides = []
    say("loading mlxq")
    with PeakMemory() as mem:
        ours, model_obj = mlxq_side(model, **{k: v for k, v in (load or {}).items() if v is not None})
        ids = prompt_ids(model_obj.tokenizer, prompt_tokens)
        ours.tokens, _ = timed(ours.generate(ids, gen_tokens), prompt_tokens)
    ours.peak_rss_gb, ours.mlx_peak_gb = mem.rss_gb, mem.mlx_gb
    sides.append(ours)
    if vs is not None:
        say(f"loading {vs}")
        with PeakMemory() as mem:
            peer = (mlx_lm_side(model, _compute_dtype(model_obj.net)) if vs == "mlx-lm"
                    else llama_cpp_side(model, prompt_tokens + gen_tokens + 16, peer_threads))
            peer.tokens, _ = timed(peer.generate(ids, gen_tokens), prompt_tokens)
        peer.peak_rss_gb = mem.rss_gb
        peer.mlx_peak_gb = mem.mlx_gb if vs == "mlx-lm" else None
        sides.append(peer)
    experts_before = model_obj.expert_stats()
    for i in range(runs):
        for side in sides:
            say(f"run {i + 1}/{runs}: {side.name}")
            tokens, figures = timed(side.generate(ids, gen_tokens), prompt_tokens)
            side.runs.append({k: round(v, 4) for k, v in figures.items()})
            side.stable = side.stable and tokens == side.tokens
    result = {
        "model": model,
        "rate_definition": RATES,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "runs": runs,
        "sides": {s.name: {"about": s.about, **{k: round(v, 4) for k, v in s.medians().items()},
                           "peak_rss_gb": _round(s.peak_rss_gb), "mlx_peak_gb": _round(s.mlx_peak_gb),
                           "stable_tokens": s.stable, "runs": s.runs} for s in sides},
    }
    if experts_before is not None:  # the timed runs' reads, hits and stalls (the peer does not touch the pool)
        streamed = model_obj.expert_stats() - experts_before
        result["experts"] = {**streamed.as_dict(), "summary": streamed.summary()}
    if vs is not None:
        a, b = result["sides"]["mlxq"], result["sides"][vs]
        key = vs.replace("-", "_").replace(".", "_")
        result["agreeing_tokens"] = next((i for i, (x, y) in enumerate(zip(ours.tokens, peer.tokens, strict=True))
                                          if x != y), gen_tokens)
        result["ratios"] = {f"{k}_vs_{key}": round(a[k] / b[k], 3) for k in ("prefill_tps", "decode_tps", "ttft_s")
                            if b[k]}
        if a["peak_rss_gb"] and b["peak_rss_gb"]:
            result["ratios"][f"peak_rss_vs_{key}"] = round(a["peak_rss_gb"] / b["peak_rss_gb"], 3)
    return result


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def show(result: dict, console) -> None:
    """One table: a row per side, and the ratio row."""
    from rich.table import Table

    table = Table(title=f"mlxq bench {result['model']}: {result['prompt_tokens']} prompt tokens, "
                  f"{result['gen_tokens']} generated, median of {result['runs']}", title_justify="left")
    for c in ("", "prefill tok/s", "decode tok/s", "TTFT s", "peak RSS +GB", "MLX peak GB", "what runs"):
        table.add_column(c, justify="left" if c in ("", "what runs") else "right")
    for name, s in result["sides"].items():
        table.add_row(name, f"{s['prefill_tps']:.1f}", f"{s['decode_tps']:.1f}", f"{s['ttft_s']:.3f}",
                      _gb(s["peak_rss_gb"]), _gb(s["mlx_peak_gb"]), s["about"])
    ratios = result.get("ratios")
    if ratios:
        peer = next(n for n in result["sides"] if n != "mlxq")
        key = peer.replace("-", "_").replace(".", "_")
        cells = [ratios.get(f"{k}_vs_{key}") for k in ("prefill_tps", "decode_tps", "ttft_s", "peak_rss")]
        table.add_row(f"mlxq / {peer}", *[f"{c:.2f}x" if c is not None else "-" for c in cells], "-",
                      f"tokens agree for {result['agreeing_tokens']}/{result['gen_tokens']}", style="bold")
    console.print(table)
    if "experts" in result:
        console.print(f"mlxq, over the timed runs: {result['experts']['summary']}")


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
