"""`mlxq export SRC -o FILE.gguf --type T`: a GGUF that llama.cpp and Ollama load."""

from __future__ import annotations

import click

from mlxq.quant.calibrate import DEFAULT_TOKENS
from mlxq.quant.recipes import GGUF_RECIPES


@click.command()
@click.argument("src")
@click.option("--out", "-o", required=True, metavar="FILE.gguf", help="New GGUF file to write (must not exist).")
@click.option("--type", "-t", "kind", default="Q4_K_M", show_default=True, metavar="TYPE",
              type=click.Choice(list(GGUF_RECIPES), case_sensitive=False),
              help="A GGUF type (" + ", ".join(k for k in GGUF_RECIPES if "_" not in k[2:] or k.startswith("TQ"))
              + ", ...) or one of llama.cpp's mixes (Q4_K_M, Q4_K_S, Q3_K_M, Q2_K, ...).")
@click.option("--set", "overrides", multiple=True, metavar="ROLE=TYPE",
              help="Per-role (or group) GGUF type, e.g. --set attn_v=Q8_0 --set experts=Q2_K. Routers, gates, "
                   "SSM state and norms keep their floors.")
@click.option("--calibrate", "-c", is_flag=False, flag_value="default", default=None, metavar="[TEXT]",
              help="Choose codes with the importance matrix and GPTQ error feedback from this text file "
                   "(no value: the pinned default corpus).")
@click.option("--calib-tokens", default=DEFAULT_TOKENS, show_default=True, type=click.IntRange(64),
              help="Calibration tokens.")
def export(src, out, kind, overrides, calibrate, calib_tokens) -> None:
    """Export SRC (HF dir, hub id, mlx-lm dir or GGUF) as a GGUF file for llama.cpp / Ollama."""
    from rich.console import Console

    from mlxq.formats.gguf.export import export as run
    from mlxq.formats.gguf.export import summary
    from mlxq.quant.recipes import gguf_recipe, parse_overrides

    recipe = gguf_recipe(kind, parse_overrides(overrides))
    result = run(src, out, recipe, calibrate=calibrate, calib_tokens=calib_tokens, console=Console(stderr=True))
    click.echo(summary(result))
