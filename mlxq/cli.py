"""The `mlxq` command line. Every error a user can cause prints one line and exits 2."""

from __future__ import annotations

import importlib
import os
import sys
from collections import Counter

import click

from mlxq.errors import InvalidRequest, MlxqError

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def _use_openblas() -> None:
    """MLX's Linux CPU wheel links reference BLAS (40x slower matmuls); re-exec once with OpenBLAS
    preloaded when it is installed. MLXQ_NO_REEXEC=1 turns this off."""
    if not sys.platform.startswith("linux") or os.environ.get("MLXQ_NO_REEXEC") or not os.path.exists(OPENBLAS):
        return
    if OPENBLAS in os.environ.get("LD_PRELOAD", ""):
        return
    env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [OPENBLAS, os.environ.get("LD_PRELOAD")])),
           "MLXQ_NO_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "mlxq.cli", *sys.argv[1:]], env)


class LazyGroup(click.Group):
    """Subcommands that live in other packages (server, quant, eval, bench) are imported only when used."""

    lazy = {
        "serve": ("server.command", "serve"),
        "quantize": ("mlxq.quant.command", "quantize"),
        "eval": ("mlxq.eval.command", "eval"),
        "export": ("mlxq.formats.gguf.command", "export"),
        "convert": ("mlxq.formats.gguf.command", "convert"),
        "bench": ("mlxq.bench.command", "bench"),
    }

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                return None
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="mlxq")
def cli() -> None:
    """mlxq: run, quantize and serve LLMs with MLX."""


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1)),
        click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0)),
        click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", default=0, type=click.IntRange(0)),
        click.option("--min-p", default=0.0, type=click.FloatRange(0, 1)),
        click.option("--repetition-penalty", default=1.0, type=click.FloatRange(0, min_open=True)),
        click.option("--seed", default=None, type=int),
    ]):
        f = opt(f)
    return f


def expert_options(f):
    """--expert-memory, --expert-prefetch and --experts-per-tok: shared by generate, chat, serve and bench."""
    for opt in reversed([
        click.option("--expert-memory", default=None, metavar="SIZE",
                     help="Stream MoE experts from the model's expert packs within SIZE of memory (8GB, 512MiB, "
                     "25%; with --hosts each rank's, or one per rank: 8GB,6GB); default: all experts in memory."),
        click.option("--expert-prefetch", default=None, type=click.IntRange(0), metavar="N",
                     help="With --expert-memory: while decoding, read the experts the next N layers' routers predict "
                     "while a layer computes (default 0: off; it pays where routing is predictable from layer to "
                     "layer, and costs reads where it is not)."),
        click.option("--experts-per-tok", default=None, type=click.IntRange(1),
                     help="Route each token to this many experts instead of the model's number."),
    ]):
        f = opt(f)
    return f


keep_quantized_option = click.option(
    "--keep-quantized", is_flag=True,
    help="Keep a GGUF model's quantized blocks (the model stays at its file size). Default: on Metal, or when the "
         "float model would not fit comfortably in memory.")


def group_options(f):
    """Options that split the model over several machines (`mlxq.distributed`)."""
    for opt in reversed([
        click.option("--hosts", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Split the model over the hosts of this mlx.launch host file (JSON); the first is this "
                     "process."),
        click.option("--parallel", type=click.Choice(["pipeline", "tensor", "experts"]), default=None,
                     help="How --hosts splits the model (default: experts for a MoE model, else pipeline)."),
        click.option("--ring-port", default=32323, show_default=True, type=click.IntRange(1, 65535),
                     help="With --hosts: the ring's first port (rank r listens on it + r)."),
        click.option("--rank-timeout", default=15.0, show_default=True, type=click.FloatRange(0, min_open=True),
                     help="With --hosts: seconds without a heartbeat before a rank counts as lost."),
    ]):
        f = opt(f)
    return f


def load_for_cli(model: str | None, keep_quantized: bool, hosts: str | None, parallel: str | None, ring_port: int,
                 rank_timeout: float, *, expert_memory: str | None = None, experts_per_tok: int | None = None,
                 expert_prefetch: int | None = None):
    """The model, on this process alone or, with `hosts`, split over a group of which this process is rank 0."""
    import mlxq

    streaming = stream_options(expert_prefetch)
    if hosts is None:
        if parallel is not None:
            raise InvalidRequest("--parallel splits the model over --hosts; give a host file")
        if expert_prefetch is not None and expert_memory is None:
            raise InvalidRequest("--expert-prefetch reads streamed experts ahead: give --expert-memory too")
        return mlxq.load(model, keep_quantized=keep_quantized or None, expert_memory=expert_memory,
                         experts_per_tok=experts_per_tok, expert_options=streaming)
    from mlxq.distributed.launch import load_on_hosts

    return load_on_hosts(model, hosts, parallel, keep_quantized=keep_quantized, experts_per_tok=experts_per_tok,
                         expert_memory=expert_memory, expert_options=streaming, ring_port=ring_port,
                         rank_timeout=rank_timeout)


def stream_options(expert_prefetch: int | None) -> dict | None:
    """The streaming options (`mlxq.experts.StreamOptions`) the command line sets: None leaves the defaults."""
    return None if expert_prefetch is None else {"prefetch": expert_prefetch}


def _sampling(kw: dict) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    return {k: kw[k] for k in keys}


@cli.command()
@click.argument("prompt")
@click.option("--model", "-m", default=None, help="Model name or path (default: smollm2).")
@click.option("--chat/--raw", default=True, help="Wrap the prompt in the chat template (default) or not.")
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--think/--no-think", default=None, help="enable_thinking for templates that have it.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--verbose", "-v", is_flag=True, help="Print timings to stderr.")
@keep_quantized_option
@expert_options
@sampling_options
@group_options
def generate(prompt, model, chat, system, think, stop, verbose, keep_quantized, expert_memory, expert_prefetch,
             experts_per_tok, max_tokens, hosts, parallel, ring_port, rank_timeout, **kw):
    """Generate an answer to PROMPT and stream it to stdout: PROMPT is a user message through the model's chat
    template (when it has one), or with --raw text the model continues."""
    if system and not chat:
        raise InvalidRequest("--system: a system message needs the chat template; leave out --raw")
    m = load_for_cli(model, keep_quantized, hosts, parallel, ring_port, rank_timeout, expert_memory=expert_memory,
                     experts_per_tok=experts_per_tok, expert_prefetch=expert_prefetch)
    before = m.expert_stats()
    if system and m.tokenizer.has_chat_template:  # else the text alone goes as the user message (`Model.read_prompt`)
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    kwargs = {"enable_thinking": think} if think is not None else {}
    result = None
    answered = False
    for chunk in m.stream(prompt, raw=not chat, max_tokens=max_tokens, stop=list(stop), chat_template_kwargs=kwargs,
                          **_sampling(kw)):
        if chunk.reasoning:
            click.echo(chunk.reasoning, nl=False, err=True)  # the think block, apart from the answer
        click.echo(chunk.text, nl=False)
        answered = answered or bool(chunk.text)
        result = chunk
    click.echo()
    if not answered and not chat and m.tokenizer.has_chat_template:
        click.echo("[no answer to the raw text; without --raw the prompt goes to the model as a user message]",
                   err=True)
    if verbose and result is not None:
        click.echo(f"[finish: {result.finish_reason}]", err=True)
    if verbose and before is not None:
        run = m.expert_stats() - before
        steps = list(m.net.expert_pool.steps)[-run.tokens:] if run.tokens else []
        click.echo(f"[{run.summary()}]", err=True)
        if steps:
            worst = max(steps, key=lambda s: s["stall_s"])
            click.echo(f"[per token: {run.bytes_read / max(run.tokens, 1) / 1e6:.2f} MB read, "
                       f"{run.stall_s / max(run.tokens, 1) * 1e3:.1f} ms stall on average; worst "
                       f"{worst['stall_s'] * 1e3:.1f} ms stall, {worst['misses']} misses]", err=True)


@cli.command()
@click.option("--model", "-m", default=None, help="Model name or path (default: smollm2).")
@click.option("--system", default=None, help="System message.")
@click.option("--think/--no-think", default=None, help="enable_thinking for templates that have it.")
@keep_quantized_option
@expert_options
@sampling_options
@group_options
def chat(model, system, think, keep_quantized, expert_memory, expert_prefetch, experts_per_tok, max_tokens, hosts,
         parallel, ring_port, rank_timeout, **kw):
    """Interactive chat (empty line or Ctrl-D quits). The cache is kept between turns."""
    from mlxq.session import Session

    m = load_for_cli(model, keep_quantized, hosts, parallel, ring_port, rank_timeout, expert_memory=expert_memory,
                     experts_per_tok=experts_per_tok, expert_prefetch=expert_prefetch)
    session = Session(m, system=system, enable_thinking=bool(think), max_tokens=max_tokens, **_sampling(kw))
    click.echo(f"mlxq chat with {m.name}: empty line or Ctrl-D to quit", err=True)
    while True:
        try:
            text = click.prompt(">", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not text.strip():
            break
        click.echo(session.ask(text))


@cli.command()
@click.argument("model", required=False)
@click.option("--diff", nargs=2, metavar="A B", default=None,
              help="Compare two models layer by layer on the same tokens (see mlxq.eval.diff).")
@click.option("--ref", default=None, metavar="R", help="With --diff: the reference both are measured against "
              "(default: A).")
@click.option("--prompt", default=None, help="With --diff: the text to run (raw, not chat-wrapped).")
@click.option("--tokens", "tokens_file", default=None, metavar="FILE",
              help="With --diff: token ids to run (a JSON list, or integers separated by spaces).")
@click.option("--gen-tokens", default=16, show_default=True, type=click.IntRange(0),
              help="With --diff: greedy tokens each model generates, to find where A and B part.")
@click.option("--json", "as_json", is_flag=True, help="With --diff: print the report as one JSON object.")
@click.option("--plot", "plot_file", default=None, metavar="FILE", help="With --diff: also write a PNG of the "
              "curves (needs matplotlib: pip install 'mlxq[plot]').")
def inspect(model, diff, ref, prompt, tokens_file, gen_tokens, as_json, plot_file):
    """Architecture, tensors, dtypes, parameters, size and quantization of MODEL (weights are not read).

    With --diff A B [--ref R] (--prompt TEXT | --tokens FILE): per-layer statistics of two or three models on
    the same tokens, their errors against the reference, the layer where the error jumps and the first
    generated token where A and B part."""
    if diff:
        return _inspect_diff(diff, ref, prompt, tokens_file, gen_tokens, as_json, plot_file)
    if model is None:
        raise InvalidRequest("mlxq inspect: give a MODEL, or --diff A B")
    import math

    from mlxq.errors import UnsupportedModel
    from mlxq.formats import open_checkpoint
    from mlxq.models import text_config
    from mlxq.quant.source import float_checkpoint

    ckpt = open_checkpoint(model)  # GGUF tensors keep their block type in the infos: exact sizes, per-type counts
    cfg = text_config(ckpt.config)
    infos = ckpt.tensors.infos()
    quant = ckpt.quantization or {}
    try:  # parameters as the float model has them: each mlx-lm quantized triple counts as its float weight
        shapes = [i.shape for i in float_checkpoint(ckpt).tensors.infos()]
    except UnsupportedModel:  # a quantization mode other than affine: counted as stored
        shapes = [i.shape for i in infos]
    params = sum(math.prod(shape) for shape in shapes)
    size = sum(i.nbytes for i in infos)
    packs = None
    if ckpt.format != "gguf":
        from mlxq.experts.pack import has_packs, open_packs

        if has_packs(ckpt.config):  # the routed experts live in expert packs, not among the tensors
            packs = open_packs(ckpt.path, ckpt.config)
            size += packs.nbytes
            params += sum(lp.n_experts * lp.dims(p)[0] * lp.dims(p)[1]
                          for lp in packs.layers.values() for p in lp.quantization)
    rows = [
        ("path", str(ckpt.path)),
        ("format", ckpt.format),
        ("architecture", str(cfg.get("model_type"))),
        ("layers", str(cfg.get("num_hidden_layers"))),
        ("hidden size", str(cfg.get("hidden_size"))),
        ("tensors", str(len(infos))),
        ("dtypes", ", ".join(f"{k}: {v}" for k, v in Counter(i.dtype for i in infos).most_common())),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("size", f"{size / 1e6:.1f} MB ({8 * size / max(params, 1):.2f} bits per parameter)"),
        ("quantization", ", ".join(f"{k}={v}" for k, v in quant.items() if not isinstance(v, dict))
         or ("GGUF blocks (see dtypes)" if ckpt.format == "gguf" else "none")),
    ]
    if packs is not None:
        from mlxq.experts.pack import describe

        rows += describe(packs)
    for key, value in rows:
        click.echo(f"{key:>13}  {value}")


def _inspect_diff(diff, ref, prompt, tokens_file, gen_tokens, as_json, plot_file) -> None:
    import json

    from rich.console import Console

    from mlxq.eval import diff as layer_diff

    if (prompt is None) == (tokens_file is None):
        raise InvalidRequest("give either --prompt TEXT or --tokens FILE")
    if plot_file:
        from mlxq.eval.report import plot_target

        plot_target(plot_file)  # a missing matplotlib or directory fails before any model is loaded
    tokens = layer_diff.read_tokens(tokens_file) if tokens_file else None
    report = layer_diff.run(diff[0], diff[1], ref, prompt, tokens, gen_tokens)
    if plot_file:
        layer_diff.plot(report, plot_file)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        layer_diff.show(report, Console(width=max(Console().width, 150)))  # ~15 columns: keep them readable
        if plot_file:
            click.echo(f"plot: {plot_file}")


@cli.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--fix", is_flag=True, help="Write a repaired copy of FILE (needs -o).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Where --fix writes the repaired file.")
@click.pass_context
def doctor(ctx, file, fix, output):
    """What mlxq sees: platform, MLX backend, BLAS, cache, default model. With a GGUF FILE: what in it llama.cpp,
    Ollama or mlxq trip over, one line per finding (exit status 2 with errors, 1 with warnings), and with --fix -o OUT
    a repaired copy that llama.cpp loads."""
    if file is not None:
        ctx.exit(_doctor_file(file, fix, output))
    if fix or output:
        raise click.UsageError("--fix and -o need a GGUF FILE")
    import platform

    import mlx.core as mx

    from mlxq.formats.fetch import ALIASES, DEFAULT_MODEL, cache_dir

    pin = ALIASES[DEFAULT_MODEL]
    rows = [
        ("platform", f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"),
        ("mlx", f"{mx.__version__}, device {mx.default_device()}, metal {mx.metal.is_available()}"),
        ("openblas", "preloaded" if OPENBLAS in os.environ.get("LD_PRELOAD", "") else
         ("installed, not preloaded" if os.path.exists(OPENBLAS) else "not installed (slow CPU matmuls)")),
        ("cache", str(cache_dir())),
        ("default model", f"{DEFAULT_MODEL}: {'cached' if pin.path.exists() else 'fetched on first use'}"),
    ]
    for key, value in rows:
        click.echo(f"{key:>13}  {value}")


def _doctor_file(file: str, fix: bool, output: str | None) -> int:
    from mlxq.formats.gguf.doctor import examine, repair, status

    if fix and not output:
        raise click.UsageError("--fix writes a new file: give it with -o OUT")
    findings = examine(file)[0]
    for f in findings:
        click.echo(f.line())
    if not findings:
        click.echo(f"{file}: no problems found")
    if not fix:
        return status(findings)
    if not any(f.fixable for f in findings):
        click.echo(f"{file}: nothing --fix can repair; {output} not written", err=True)
        return status(findings)
    left = repair(file, output)
    click.echo(f"wrote {output}: " + (f"{len(left)} finding(s) left" if left else "no problems left"))
    for f in left:
        click.echo(f.line())
    return status(left)


def main() -> None:
    _use_openblas()
    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except MlxqError as e:
        click.echo(f"mlxq: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the machine said no (no space, no permission, read-only, ...): one line, like our own
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"mlxq: error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:  # bad options and arguments: one line too, not click's usage block
        click.echo(f"mlxq: error: {e.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
