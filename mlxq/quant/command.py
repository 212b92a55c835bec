"""`mlxq quantize SRC -o OUT`: streaming, role-aware, optionally calibrated quantization to an mlx-lm directory."""

from __future__ import annotations

import click

from mlxq.quant.calibrate import DEFAULT_TOKENS
from mlxq.quant.pipeline import METHODS
from mlxq.quant.recipes import BITS, GROUP_SIZES, RECIPES

DTYPES = ("float16", "bfloat16", "float32")


def _recipes_help() -> str:
    return "; ".join(f"{name}: {r.about}" for name, r in RECIPES.items())


@click.command()
@click.argument("src")
@click.option("--out", "-o", required=True, metavar="OUT", help="New directory to write (must not exist).")
@click.option(
    "--bits",
    "-b",
    type=click.Choice([str(b) for b in BITS]),
    default=None,
    help="Uniform bits for every quantizable tensor (default 4 when no --recipe).",
)
@click.option("--recipe", "-r", type=click.Choice(sorted(RECIPES)), default=None, help=_recipes_help())
@click.option(
    "--group-size",
    "-g",
    type=click.Choice([str(g) for g in GROUP_SIZES]),
    default=None,
    help="Weights per scale/bias group (default 64).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="ROLE=BITS",
    help="Per-role (or group) precision: bits, float or ternary, e.g. --set attn_v=6 --set experts=2. "
    "Routers, gates, SSM state and norms keep their floors.",
)
@click.option(
    "--calibrate",
    "-c",
    is_flag=False,
    flag_value="default",
    default=None,
    metavar="[TEXT]",
    help="Calibrate on a text file, or with no value on the pinned default corpus.",
)
@click.option(
    "--calib-tokens", default=DEFAULT_TOKENS, show_default=True, type=click.IntRange(64), help="Calibration tokens."
)
@click.option(
    "--method",
    "-m",
    type=click.Choice(METHODS),
    default="auto",
    show_default=True,
    help="rtn: round to nearest (mlx_lm.convert); search: importance-weighted clip search; gptq: "
    "GPTQ error feedback. auto: gptq when calibrating, else rtn.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="Dtype of unquantized tensors (default float16; bfloat16 sources stay bfloat16).",
)
@click.option("--shard-size", default=5.0, show_default=True, type=click.FloatRange(0.01), help="Largest shard, GB.")
@click.option(
    "--stream-experts",
    is_flag=True,
    help="Write routed experts as expert packs (one file per MoE layer, one aligned block per expert) for "
    "streaming from SSD (mlxq.load(..., expert_memory=...), --expert-memory).",
)
@click.option(
    "--order",
    type=click.Choice(["identity", "coactivation"]),
    default="identity",
    show_default=True,
    help="Expert order in the packs: coactivation places experts routed together next to each other "
    "(measured on the calibration text; the router is permuted to match, the output does not change).",
)
@click.option("--report", is_flag=True, help="Afterwards, print perplexity and KL against SRC on held-back text.")
@click.option(
    "--report-tokens", default=4096, show_default=True, type=click.IntRange(2), help="Tokens scored by --report."
)
def quantize(
    src,
    out,
    bits,
    recipe,
    group_size,
    overrides,
    calibrate,
    calib_tokens,
    method,
    dtype,
    shard_size,
    stream_experts,
    order,
    report,
    report_tokens,
) -> None:
    """Quantize SRC (HF dir, hub id, mlx-lm dir or GGUF) into OUT, an mlx-lm compatible directory."""
    import mlx.core as mx
    from rich.console import Console

    from mlxq.quant.pipeline import quantize as run
    from mlxq.quant.recipes import make_recipe, parse_overrides

    console = Console(stderr=True)
    the_recipe = make_recipe(
        recipe, int(bits) if bits else None, int(group_size) if group_size else None, parse_overrides(overrides)
    )
    result = run(
        src,
        out,
        the_recipe,
        calibrate=calibrate,
        method=method,
        dtype=getattr(mx, dtype) if dtype else None,
        shard_bytes=int(shard_size * 1e9),
        calib_tokens=calib_tokens,
        console=console,
        stream_experts=stream_experts,
        order=order,
    )
    click.echo(
        f"{result.out}: {result.quantized}/{result.tensors} tensors quantized ({the_recipe.name}, "
        f"{result.method}), {result.bytes_out / 1e6:.1f} MB, {result.bpw_quantized:.3f} bits per quantized "
        f"weight, {result.bpw:.3f} overall, {result.seconds:.1f} s"
    )
    if report and stream_experts:
        console.print("mlxq: --report is skipped for expert packs (evaluate the directory written without "
                      "--stream-experts: the weights are the same)", highlight=False)
    elif report:
        # The report is the `mlxq eval kl` verb run on what was written: reached through the command line both verbs
        # belong to, so quantization never imports evaluation (the arrow points from eval to quant).
        ctx = click.get_current_context()
        root = ctx.find_root().command
        group = root.get_command(ctx, "eval") if isinstance(root, click.Group) else None
        kl = group.get_command(ctx, "kl") if isinstance(group, click.Group) else None
        if kl is None:
            raise click.UsageError("--report runs `mlxq eval kl`, which this command line does not have")
        ctx.invoke(kl, model=str(result.out), ref=src, max_tokens=report_tokens)
