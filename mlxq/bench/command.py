"""`mlxq bench [MODEL] [--io PACKDIR]`. `--io`: the device's read rate at the expert size, the ceiling expert
streaming is held to (random one-expert reads with O_DIRECT / F_NOCACHE, as the runtime reads)."""

from __future__ import annotations

import json

import click

from mlxq.errors import InvalidRequest


@click.command()
@click.argument("model", required=False)
@click.option("--io", "io_dir", default=None, metavar="PACKDIR",
              help="Measure the read rate of the device holding PACKDIR's expert packs (a model directory written "
              "with --stream-experts, or its experts/ directory) at the expert size.")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1), help="Reads in flight.")
@click.option("--seconds", default=3.0, show_default=True, type=click.FloatRange(0.1), help="How long to read.")
@click.option("--cached", is_flag=True, help="Read through the page cache (default: bypass it).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench(model, io_dir, threads, seconds, cached, as_json) -> None:
    """Measure what this machine does: --io PACKDIR reads expert packs as the streaming runtime does."""
    if model is not None:
        raise InvalidRequest("mlxq bench MODEL: model benchmarks are not available yet (use --io PACKDIR)")
    if io_dir is None:
        raise InvalidRequest("mlxq bench: nothing to measure (give --io PACKDIR)")
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
