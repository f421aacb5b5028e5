"""What a hostile or careless client can do to the server: each defect found by probing it
has a test here that failed before its fix."""
# ruff: noqa: F811 (pytest fixtures imported from test_server are parameters here)
from __future__ import annotations

import httpx
import pytest

from test_server import MODEL, client, offline, server  # noqa: F401 (fixtures)

LONG_STOP = "this stop string is longer than anything generated so far"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_text_equals_the_whole_text_for_any_stop_strings(client, path):
    """visible_text() once computed text[:len - hold] with len < hold, a negative index."""
    base = client.completions.create(model=MODEL, prompt="def main():", temperature=0, max_tokens=40).choices[0].text
    late = base[30:34]  # matched late: everything before it streams, nothing of it
    for stop in ([LONG_STOP], [LONG_STOP, late], ["x" * 3, late]):
        if path == "/v1/completions":
            kwargs = dict(model=MODEL, prompt="def main():", temperature=0, max_tokens=40, stop=stop)
            whole = client.completions.create(**kwargs).choices[0].text
            parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
        else:
            kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Write a loop."}], temperature=0,
                          max_tokens=40, stop=stop)
            whole = client.chat.completions.create(**kwargs).choices[0].message.content
            chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
            parts = [c.choices[0].delta.content or "" for c in chunks]
            assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
        assert "".join(parts) == whole, (stop, parts)
