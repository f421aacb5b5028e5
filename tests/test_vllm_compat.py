"""docs/coming-from-vllm.md stays true: every row of its tables is checked here."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

import lanner
from lanner.cli import build_parser, serve_configs
from lanner.config import EngineConfig
from lanner.errors import ConfigError
from lanner.server.protocol import NOT_SUPPORTED, ChatRequest, CompletionRequest

DOC = Path(__file__).parent.parent / "docs" / "coming-from-vllm.md"
STATUSES = {"same", "differs", "refused", "missing"}


def table(section: str) -> list[tuple[str, str]]:
    """(example, status) of each row of the table under `## section`."""
    text = DOC.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    out = []
    for line in rows:
        example, status = (cell.strip() for cell in line.strip("|").split("|")[:2])
        assert status in STATUSES, line
        out.append((example.strip("`"), status))
    assert out, f"no rows under {section}"
    return out


def call_kwargs(example: str) -> dict:
    call = ast.parse(f"f({example})", mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


@pytest.mark.parametrize("example,status", table("Engine options"))
def test_engine_options(example, status):
    kwargs = call_kwargs(example)
    if status == "refused":
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            EngineConfig.from_kwargs(**kwargs)
    else:
        assert status in ("same", "differs")
        EngineConfig.from_kwargs(**kwargs)


@pytest.mark.parametrize("example,status", table("Server flags (`lanner serve`)"))
def test_server_flags(example, status, monkeypatch, capsys):
    monkeypatch.delenv("LANNER_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    argv = ["serve", *shlex.split(example)]
    if status in ("missing", "refused"):  # refused: a value the flag does not take
        with pytest.raises((SystemExit, ConfigError)):
            serve_configs(build_parser().parse_args(argv))
        return
    serve_configs(build_parser().parse_args(argv))


@pytest.mark.parametrize("field,status", table("Request fields (`/v1/completions`, `/v1/chat/completions`)"))
def test_request_fields(field, status):
    known = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields)
    if status == "missing":
        assert field not in known
    elif status == "refused":
        assert field in NOT_SUPPORTED
    else:
        assert field in known and field not in NOT_SUPPORTED


@pytest.mark.parametrize("call,status", table("Offline API"))
def test_offline_api(call, status):
    owner, name = re.match(r"(\w+)\.(\w+)", call).groups()
    cls = getattr(lanner, owner)
    present = hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {})
    assert present == (status != "missing"), call
    if status != "missing" and name in ("finished", "clone", "get_tokenizer", "reset_prefix_cache"):
        assert callable(getattr(cls, name))
