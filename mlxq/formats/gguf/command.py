"""`mlxq export SRC -o FILE.gguf --type T`: a GGUF that llama.cpp and Ollama load; `mlxq convert SRC -o DST`
between mlx-lm directories and GGUF files, a thin layer over the export and the quantize pipeline."""

from __future__ import annotations

from collections import Counter

import click

from mlxq.formats.base import Checkpoint
from mlxq.quant.calibrate import DEFAULT_TOKENS
from mlxq.quant.recipes import BITS, GGUF_RECIPES

# mlx-lm bits -> the GGUF mix of about that size (convert's default when --type is not given)
GGUF_FOR_BITS = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}


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
              help="Choose codes with statistics of this text (no value: the pinned default corpus).")
@click.option("--method", "-m", type=click.Choice(["allocate", "imatrix", "gptq"]), default="allocate",
              show_default=True,
              help="With --calibrate: allocate: imatrix's fits, tensor types moved within the mix by the KL each move "
                   "measurably adds on the text, at no more bits; imatrix: ggml's importance-weighted fits (as "
                   "llama-quantize --imatrix); gptq: codes and block scales chosen against each layer's Hessian.")
@click.option("--calib-tokens", default=DEFAULT_TOKENS, show_default=True, type=click.IntRange(64),
              help="Calibration tokens.")
@click.option("--no-mtp", is_flag=True,
              help="Leave out the multi-token-prediction blocks (Qwen3.5 / Qwen3-Next; written by default, as "
                   "llama.cpp's converter does).")
def export(src, out, kind, overrides, calibrate, method, calib_tokens, no_mtp) -> None:
    """Export SRC (HF dir, hub id, mlx-lm dir or GGUF) as a GGUF file for llama.cpp / Ollama."""
    from rich.console import Console

    from mlxq.formats.gguf.export import export as run
    from mlxq.formats.gguf.export import summary
    from mlxq.quant.recipes import gguf_recipe, parse_overrides

    recipe = gguf_recipe(kind, parse_overrides(overrides))
    result = run(src, out, recipe, calibrate=calibrate, method=method, calib_tokens=calib_tokens,
                 console=Console(stderr=True), mtp=not no_mtp)
    click.echo(summary(result))


@click.command()
@click.argument("src")
@click.option("--out", "-o", required=True, metavar="DST",
              help="DST.gguf: a GGUF file; anything else: a new mlx-lm directory.")
@click.option("--type", "-t", "kind", default=None, metavar="TYPE",
              type=click.Choice(list(GGUF_RECIPES), case_sensitive=False),
              help="GGUF type or mix of a .gguf DST (default: about the source's bits, e.g. 4-bit -> Q4_K_M).")
@click.option("--bits", "-b", type=click.Choice([str(b) for b in BITS]), default=None,
              help="Bits of an mlx-lm DST (default: the source's, e.g. Q6_K -> 6; float stays float).")
def convert(src, out, kind, bits) -> None:
    """Convert SRC between an mlx-lm directory and a GGUF file. Re-quantizing already quantized weights loses more
    than quantizing the original once: that is said, with the better command."""
    from rich.console import Console

    from mlxq.formats import open_checkpoint
    from mlxq.formats.gguf.export import export as run_export
    from mlxq.formats.gguf.export import summary
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import RECIPES, Recipe, gguf_recipe, uniform

    console = Console(stderr=True)
    ckpt = open_checkpoint(src)
    if out.endswith(".gguf"):
        result = run_export(src, out, gguf_recipe(kind or _gguf_type_for(ckpt)), console=console)
        click.echo(summary(result))
        return
    b = int(bits) if bits else _bits_for(ckpt)
    if b is None and _ternary(ckpt):
        recipe = RECIPES["ternary"]
    else:
        recipe = uniform(b) if b else Recipe("float", "float", about="unquantized")
    result = quantize(src, out, recipe, console=console)
    click.echo(f"{result.out}: {result.quantized}/{result.tensors} tensors quantized ({recipe.name}), "
               f"{result.bytes_out / 1e6:.1f} MB, {result.seconds:.1f} s")


def _bits_for(ckpt: Checkpoint) -> int | None:
    """The bits of the source's dominant quantized type (by bytes), None when it holds floats."""
    quant = ckpt.quantization
    if isinstance(quant, dict) and quant.get("bits"):
        return int(quant["bits"])
    kinds = Counter()
    for info in ckpt.tensors.infos():
        if info.dtype.startswith(("Q", "IQ", "TQ")):
            kinds[info.dtype] += info.nbytes
    if not kinds:
        return None
    kind = kinds.most_common(1)[0][0]
    digit = int(kind.lstrip("IT")[1])
    return 2 if kind.startswith("TQ") else min((b for b in BITS if b >= digit), default=8)


def _ternary(ckpt: Checkpoint) -> bool:
    from mlxq.quant.source import quantized_as

    return (quantized_as(ckpt) or "").startswith("ternary")


def _gguf_type_for(ckpt: Checkpoint) -> str:
    b = _bits_for(ckpt)
    if b is None:
        return "TQ2_0" if _ternary(ckpt) else "F16"
    return GGUF_FOR_BITS[b]
