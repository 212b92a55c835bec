"""`mlxq bench MODEL [--vs mlx-lm|llama.cpp]`: prefill and decode tokens/s, time to first token and peak memory of
mlxq and of a peer on the same weights in the same run, with ratios (mlxq.bench.runtime); expert-stream
statistics when the model streams its experts. `--io PACKDIR`: the device's read rate at the expert size, the
ceiling expert streaming is held to (random one-expert reads with O_DIRECT / F_NOCACHE, as the runtime reads)."""

from __future__ import annotations

import json

import click

from mlxq.cli import expert_options, keep_quantized_option, stream_options
from mlxq.errors import InvalidRequest


@click.command()
@click.argument("model", required=False)
@click.option("--vs", type=click.Choice(["mlx-lm", "llama.cpp"]), default=None,
              help="Also run this peer on the same weights (mlx-lm: MODEL is an mlx-lm/HF directory; llama.cpp: "
              "MODEL is a GGUF, run through llama-cpp-python) and print mlxq / peer ratios.")
@click.option("--prompt-tokens", default=512, show_default=True, type=click.IntRange(1), help="Prompt length.")
@click.option("--gen-tokens", default=128, show_default=True, type=click.IntRange(2), help="Tokens generated.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per side (median).")
@click.option("--peer-threads", default=None, type=click.IntRange(1),
              help="--vs llama.cpp: its threads, decode and prompt (default: llama-cpp-python's, half the cores decode "
              "and all prefill; its pool spins while waiting, so on a busy machine fewer can be much faster).")
@keep_quantized_option
@expert_options
@click.option("--io", "io_dir", default=None, metavar="PACKDIR",
              help="Measure the read rate of the device holding PACKDIR's expert packs (a model directory written "
              "with --stream-experts, or its experts/ directory) at the expert size.")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1), help="--io: reads in flight.")
@click.option("--seconds", default=3.0, show_default=True, type=click.FloatRange(0.1), help="--io: how long to read.")
@click.option("--cached", is_flag=True, help="--io: read through the page cache (default: bypass it).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(model, vs, prompt_tokens, gen_tokens, runs, peer_threads, keep_quantized, expert_memory, expert_prefetch,
          experts_per_tok, io_dir, threads, seconds, cached, as_json) -> None:
    """Measure what this machine does: MODEL's speed and memory (against a peer with --vs), or with --io PACKDIR
    how fast expert packs read."""
    if (model is None) == (io_dir is None):
        raise InvalidRequest("mlxq bench: give a MODEL, or --io PACKDIR")
    if io_dir is not None:
        return _io(io_dir, threads, seconds, cached, as_json)
    from rich.console import Console

    from mlxq.bench import runtime
    from mlxq.bench.record import machine

    console = Console(stderr=True)
    load = {"keep_quantized": keep_quantized or None, "expert_memory": expert_memory,
            "experts_per_tok": experts_per_tok, "expert_options": stream_options(expert_prefetch)}
    with console.status("mlxq bench") as status:
        def progress(what: str) -> None:
            status.update(f"mlxq bench: {what}")
            if not console.is_terminal:  # no live status line: one line per step
                console.print(f"mlxq bench: {what}", highlight=False)

        result = runtime.run(model, vs, prompt_tokens, gen_tokens, runs, load, progress=progress,
                             peer_threads=peer_threads)
    result["machine"] = facts = machine()
    if as_json:
        click.echo(json.dumps(result))
        return
    runtime.show(result, Console(width=max(Console().width, 120)))
    if facts["blas"]["kind"] == "reference":
        console.print("mlxq bench: MLX used reference BLAS (about 40x slower matmuls): preload OpenBLAS", style="red")


def _io(io_dir: str, threads: int, seconds: float, cached: bool, as_json: bool) -> None:
    from mlxq.experts.io import measure_read_rate
    from mlxq.experts.pack import open_pack_dir

    packs = open_pack_dir(io_dir)
    result = {"packs": str(packs.root), **measure_read_rate(packs, threads, seconds, direct=not cached)}
    if as_json:
        click.echo(json.dumps(result))
        return
    mode = "O_DIRECT/F_NOCACHE" if result["direct"] else "page cache"
    click.echo(f"{result['gb_per_s']:.3f} GB/s reading {result['read_bytes'] / 1e6:.2f} MB experts ({mode}, "
               f"{threads} in flight, {result['reads']} reads, {result['ms_per_read']:.2f} ms each)")
