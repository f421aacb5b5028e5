"""The `lanner` command: generate, chat, serve, bench."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from lanner.config import EngineConfig, ServerConfig, add_cli_args, add_dataclass_args, kwargs_from_args
from lanner.core.heap import freeze_heap
from lanner.core.request import RequestOutputKind, SamplingParams
from lanner.errors import ConfigError, LannerError

CLI_SAMPLING_DEFAULTS = {"max_tokens": 128}
# one completion on a terminal: no samples or logprobs to show, no mappings or callables to type
NO_SAMPLING_FLAG = ("seed", "n", "prompt_logprobs", "logprobs", "logit_bias", "logits_processors",
                    "output_kind")


def _engine(args: argparse.Namespace):
    from lanner.engine.engine import LLMEngine

    return LLMEngine(EngineConfig.from_kwargs(**kwargs_from_args(args, EngineConfig)))


def _params(engine, args: argparse.Namespace) -> SamplingParams:
    """Command-line options over the model's recommended settings over the CLI's defaults."""
    return engine.default_sampling_params(**{**CLI_SAMPLING_DEFAULTS, **kwargs_from_args(args, SamplingParams)})


def _stream(engine, request_id: str, prompt, params: SamplingParams) -> str:
    """Run one request to the end, printing its text as it grows."""
    engine.add_request(request_id, prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    pieces = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].text)
            print(pieces[-1], end="", flush=True)
    print()
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> None:
    engine = _engine(args)
    print(args.prompt, end="", flush=True)
    _stream(engine, "cli", args.prompt, _params(engine, args))


def cmd_chat(args: argparse.Namespace) -> None:
    engine = _engine(args)
    params = _params(engine, args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("lanner chat: an empty line or Ctrl-D ends the conversation.")
    for turn in range(1 << 62):
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = _stream(engine, f"chat-{turn}", engine.render_chat(history), params)
        history.append({"role": "assistant", "content": reply})


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


API_KEY_VARIABLES = ("LANNER_API_KEY", "VLLM_API_KEY")


def serve_configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The server's and the engine's options from `lanner serve`'s arguments, with vLLM's
    conveniences: the model as a positional argument, the API key from the environment,
    a chat template given as a file, the model's name as the default served name."""
    from lanner.default_model import default_model_path

    engine_kwargs = kwargs_from_args(args, EngineConfig)
    if args.model_tag is not None:
        if engine_kwargs.get("model") not in (None, args.model_tag):
            raise ConfigError(f"two models given: {args.model_tag!r} and --model {engine_kwargs['model']!r}")
        engine_kwargs["model"] = args.model_tag
    engine_config = EngineConfig.from_kwargs(**engine_kwargs)
    config = ServerConfig(**kwargs_from_args(args, ServerConfig))
    if config.api_key is None:
        config.api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v) is not None), None)
    if config.api_key is not None and not config.api_key.strip():
        raise ConfigError("the API key is empty (--api-key or $LANNER_API_KEY/$VLLM_API_KEY): an empty key would "
                          "serve everyone; unset it to run without one")
    if config.chat_template and os.path.isfile(config.chat_template):
        config.chat_template = Path(config.chat_template).read_text()
    model = engine_config.model.model or default_model_path()
    # a folder or config.json by its name; a Hub repo id whole, as vLLM names it
    default_name = Path(model).name.removesuffix(".json") if os.path.exists(model) else model
    config.served_model_name = config.served_model_name or [default_name]
    return config, engine_config


def uvicorn_options(config: ServerConfig) -> dict:
    from lanner.server.connections import header_deadline_protocol  # needs the server extra

    return {"host": config.host, "port": config.port, "log_level": "info",
            "access_log": not config.disable_uvicorn_access_log,
            "http": header_deadline_protocol(config.header_timeout_s),
            "timeout_graceful_shutdown": int(config.drain_timeout_s) + 5,  # our drain ends every response first
            "ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile, "root_path": config.root_path or ""}


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lanner.server.app import build_app
    except ImportError as e:
        raise ConfigError(f"`lanner serve` needs the server extra: pip install 'lanner[server]' ({e})") from e
    from lanner.server.metrics import ServerMetrics
    from lanner.serving.async_engine import AsyncEngine

    config, engine_config = serve_configs(args)
    from lanner.executor.worker import hosts_ranks_only

    if hosts_ranks_only(engine_config):  # a machine (or torchrun process) of other ranks: no server here
        from lanner.engine.engine import LLMEngine

        LLMEngine(engine_config)  # runs this machine's ranks until rank 0 stops them, then exits
        return
    metrics = ServerMetrics()
    # a SIGTERM while the engine loads exits normally, so the engine process is stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if config.engine_process:
        engine = AsyncEngine.spawn(engine_config, config.max_waiting_requests, observer=metrics)
    else:
        from lanner.engine.engine import LLMEngine

        engine = AsyncEngine(LLMEngine(engine_config), config.max_waiting_requests, observer=metrics)
    app = build_app(engine, config, metrics)
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(config)))
    freeze_heap()  # this process is the server's (and, with --no-engine-process, the engine's)

    def stop(signum, frame) -> None:  # a second signal stops at once
        if not server.should_exit:
            drain = threading.Timer(config.drain_timeout_s, engine.fail_open_requests,
                                    args=("the server is shutting down",))
            drain.daemon = True
            drain.start()
        server.force_exit = server.should_exit
        server.should_exit = True

    # SIGTERM/SIGINT: stop accepting, let open responses finish (up to 30 s), then the app's
    # shutdown aborts what is left and stops the engine thread; the exit code is 0 (uvicorn's own
    # handlers would re-raise the signal after shutting down)
    server.capture_signals = contextlib.nullcontext
    server.install_signal_handlers = lambda: None
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.run()  # uvicorn's loop factory: uvloop when installed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanner", description="fast, compact LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    gen.add_argument("prompt")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="the model, as --model (a Hub repo id, a folder or a config.json)")
    serve.set_defaults(func=cmd_serve)
    add_dataclass_args(serve, ServerConfig, "server options")
    add_cli_args(serve)
    from lanner.bench.runs import add_parser as add_bench_parser

    add_bench_parser(sub)
    for p in (gen, chat):
        add_cli_args(p)
        add_dataclass_args(p, SamplingParams, "sampling options", skip=NO_SAMPLING_FLAG)
    return parser


def cmd_bench(args: argparse.Namespace) -> None:
    from lanner.bench.runs import main as bench_main

    bench_main(args, kwargs_from_args(args, EngineConfig))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and not getattr(args, "serve_bench", False):
        args.func = cmd_bench  # engine benchmarks; `bench serve` is a client and has its own
    try:
        args.func(args)
    except LannerError as e:
        print(f"lanner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
