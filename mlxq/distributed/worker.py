"""A rank other than 0 of a group started by `mlxq ... --hosts` (`launch.py`): joins the ring, loads its share of
the model, follows rank 0 until it ends the group. Exit status 0 when rank 0 ended it, 1 when the group was lost."""

from __future__ import annotations

import json
import logging
import sys

import click

from mlxq.errors import MlxqError


@click.command()
@click.argument("model")
@click.option("--parallel", default=None)
@click.option("--keep-quantized", is_flag=True)
@click.option("--experts-per-tok", type=int, default=None)
@click.option("--expert-memory", default=None)
@click.option("--expert-options", default=None, help="StreamOptions as JSON (rank 0's, passed on)")
def main(model: str, parallel: str | None, keep_quantized: bool, experts_per_tok: int | None,
         expert_memory: str | None, expert_options: str | None) -> None:
    import mlx.core as mx

    import mlxq

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    group = mx.distributed.init(backend="ring", strict=True)
    try:
        mlxq.load(model, group=group, parallel=parallel, keep_quantized=keep_quantized or None,
                  experts_per_tok=experts_per_tok, expert_memory=expert_memory,
                  expert_options=json.loads(expert_options) if expert_options else None).follow()
    except MlxqError as e:
        click.echo(f"mlxq: rank {group.rank()}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
