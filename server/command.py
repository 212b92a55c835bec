"""`mlxq serve [MODEL]`: the OpenAI-compatible server on one model (the default small model when omitted)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

import click

from mlxq.cli import expert_options, group_options, keep_quantized_option, load_for_cli
from mlxq.errors import GenerationError, InvalidRequest


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="MLXQ_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 (also from MLXQ_API_KEY; an empty key is an error).",
)
@click.option("--served-model-name", default=None, help="Model id clients use (default: MODEL, or smollm2).")
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Requests decoded together; more wait their turn.",
)
@click.option(
    "--max-tokens",
    "max_tokens",
    default=4096,
    show_default=True,
    type=click.IntRange(1),
    help="Most completion tokens one request may ask for.",
)
@click.option(
    "--max-request-mb",
    default=4.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest request body accepted.",
)
@click.option(
    "--prompt-cache-mb",
    default=1024,
    show_default=True,
    type=click.IntRange(0),
    help="Memory kept for reusing prompt prefixes across requests (0: off).",
)
@click.option(
    "--prompt-cache-spill",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory where prompt-cache entries go when they leave memory, to come back when a prompt needs them.",
)
@click.option(
    "--prompt-cache-spill-mb",
    default=4096,
    show_default=True,
    type=click.IntRange(1),
    help="Disk the spilled prompt cache may take.",
)
@click.option(
    "--thinking/--no-thinking",
    default=None,
    help="enable_thinking when a request does not say (default: what the chat template does).",
)
@click.option(
    "--thinking-budget",
    default=None,
    type=click.IntRange(0),
    help="Reasoning tokens before '</think>' is forced, when a request does not say.",
)
@keep_quantized_option
@expert_options
@click.option(
    "--allow-request-templates",
    is_flag=True,
    help="Let requests send their own chat template (chat_template_kwargs.chat_template): arbitrary Jinja, "
    "rendered within a time and size budget. Off: such requests get a 400.",
)
@group_options
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    model,
    host,
    port,
    api_key,
    served_model_name,
    max_batch,
    max_tokens,
    max_request_mb,
    prompt_cache_mb,
    prompt_cache_spill,
    prompt_cache_spill_mb,
    thinking,
    thinking_budget,
    keep_quantized,
    expert_memory,
    expert_prefetch,
    experts_per_tok,
    allow_request_templates,
    hosts,
    parallel,
    ring_port,
    rank_timeout,
    log_level,
):
    """Serve MODEL (default: smollm2) over an OpenAI-compatible HTTP API: /v1/chat/completions,
    /v1/completions, /v1/models, /health."""
    import uvicorn
    from rich.console import Console

    from mlxq.formats.fetch import DEFAULT_MODEL
    from server.app import build_app
    from server.prepare import Limits

    if api_key is None and os.environ.get("MLXQ_API_KEY") is not None:
        api_key = os.environ["MLXQ_API_KEY"]  # click reads an empty variable as unset; here it is an error
    if api_key is not None and not api_key.strip():
        raise InvalidRequest("--api-key / MLXQ_API_KEY is empty: give a key, or unset it to serve without auth")
    _check_bindable(host, port)  # before the model loads, not after
    console = Console(stderr=True, log_path=False)
    name = served_model_name or model or DEFAULT_MODEL
    if not _loopback(host) and not api_key:
        console.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    t0 = time.perf_counter()
    with console.status(f"loading {model or DEFAULT_MODEL} (fetched on first use)...") as status:
        loaded = load_for_cli(model, keep_quantized, hosts, parallel, ring_port, rank_timeout,
                              expert_memory=expert_memory, experts_per_tok=experts_per_tok,
                              expert_prefetch=expert_prefetch)
        console.log(f"loaded {model or DEFAULT_MODEL} in {time.perf_counter() - t0:.1f} s")
        status.update("building the engine and token tables...")
        limits = Limits(max_tokens=max_tokens, max_request_bytes=int(max_request_mb * (1 << 20)),
                        allow_request_templates=allow_request_templates)
        app, engine = build_app(
            loaded,
            list(dict.fromkeys([name, model or DEFAULT_MODEL])),
            api_key=api_key,
            limits=limits,
            max_batch=max_batch,
            prompt_cache_bytes=prompt_cache_mb << 20,
            default_thinking=thinking,
            thinking_budget=thinking_budget,
            prompt_cache_spill=prompt_cache_spill and (prompt_cache_spill, prompt_cache_spill_mb << 20),
        )
        try:
            status.update("warming up...")
            _warm_up(engine, loaded)
        except BaseException:
            engine.close()
            raise
    console.log(
        f"ready in {time.perf_counter() - t0:.1f} s: model '{name}' at http://{_url_host(host)}:{port}/v1, "
        + ("auth on (bearer key)" if api_key else "auth off (no --api-key)")
        + (", request chat templates allowed" if allow_request_templates else "")
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()


def _warm_up(engine, model) -> None:
    """One short request through the whole engine path, so the first client does not pay for first-call setup."""
    from mlxq.engine.scheduler import Request

    done = threading.Event()
    failure = []

    def on_output(out) -> None:
        if out.error is not None:
            failure.append(out.error)
        if out.finish_reason is not None:
            done.set()

    ids = model.tokenizer.encode("Hello") or [0]
    engine.submit(Request(ids, 2, on_output=on_output))
    if not done.wait(120) or failure:
        raise GenerationError(f"the engine failed its warm-up request: {failure[0] if failure else 'timed out'}")


def _check_bindable(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise InvalidRequest(f"cannot listen on {_url_host(host)}:{port}: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
