"""Tool calling: which tools reach the chat template, what grammar forces a call, and which parser
reads the calls back (OpenAI's `tools` and `tool_choice`, with vLLM's server options).

- `none`: the tools are rendered, nothing is parsed.
- `auto` (the default when tools are given): the model decides; the server's
  `--tool-call-parser` reads its syntax back. Refused unless the server runs with
  `--enable-auto-tool-choice`, as vLLM does.
- `required`, or a named function: a JSON-schema grammar forces the call, so the arguments always
  parse: for a named function the output is its arguments object; for `required` a JSON array of
  {"name", "parameters"} objects (one at most with parallel_tool_calls false). Both are compact JSON
  (no whitespace between tokens): a model cannot pad them until it runs out of tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lanner.server.protocol import Tool, refuse
from lanner.server.tool_parsers import TOOL_PARSERS, forced_parser


@dataclass
class ToolPlan:
    render: list[dict] | None  # the tools the chat template sees
    structured: dict | None  # the grammar that forces a call (StructuredOutputsParams' fields)
    parser: Any  # makes the parser of the output, or None: no tool calls are read back
    parallel: bool = True  # more than one call may be returned


def plan_tools(tools: list[Tool] | None, tool_choice: str | dict | None, parallel: bool | None,
               auto_parser: str | None) -> ToolPlan:
    """`auto_parser`: the server's --tool-call-parser when --enable-auto-tool-choice is on."""
    parallel = parallel is not False
    if not tools:
        if tool_choice not in (None, "none"):
            raise refuse("tool_choice", "needs tools")
        return ToolPlan(None, None, None)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise refuse("tools", "function names must be unique")
    render = [t.model_dump(exclude_none=True) for t in tools]
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(render, None, None)
    if choice == "auto":
        if auto_parser is None:
            raise refuse("tool_choice", '"auto" needs the server to run with --enable-auto-tool-choice and '
                                        "--tool-call-parser")
        return ToolPlan(render, None, lambda: TOOL_PARSERS[auto_parser](), parallel)
    if choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                              "parameters": _parameters(t)},
                            "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
        schema = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return ToolPlan(render, {"json": schema, "disable_any_whitespace": True}, lambda: forced_parser(None), parallel)
    name = _named(choice)
    if name not in names:
        raise refuse("tool_choice", f"names function {name!r}, which is not among the tools")
    tool = tools[names.index(name)]
    return ToolPlan(render, {"json": _parameters(tool), "disable_any_whitespace": True}, lambda: forced_parser(name),
                    False)


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _named(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return choice["function"]["name"]
    raise refuse("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                '{"name": ...}}')
