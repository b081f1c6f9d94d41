"""Usage is read from the SDKs' response models without going through pydantic's ``__getattr__``.

A missing field on a pydantic model raises (and formats) an ``AttributeError`` inside ``__getattr__``, ~2 µs each,
and the usage parsers probe fields one endpoint or vendor lacks (``input_tokens`` on a chat completion,
``cache_write_tokens`` on OpenAI's token details) on every call. These tests count those raises during real calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pydantic
import pytest

import tokenbudget
from tokenbudget.integrations.anthropic import AnthropicAdapter
from tokenbudget.integrations.base import field_of
from tokenbudget.integrations.openai import OpenAIAdapter
from tokenbudget.testing import Reply, StandInServer

_PYDANTIC_MAIN = pydantic.main.__file__


@contextmanager
def pydantic_getattr_calls() -> Iterator[list[str]]:
    """Names looked up through pydantic's ``BaseModel.__getattr__`` while the block runs (this thread)."""
    seen: list[str] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "__getattr__" and frame.f_code.co_filename == _PYDANTIC_MAIN:
            seen.append(str(frame.f_locals.get("item")))

    previous: Callable[..., Any] | None = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


def test_openai_usage_is_read_without_pydantic_getattr(openai_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(input_tokens=1000, output_tokens=500, cached_tokens=200, reasoning_tokens=50)
    response = openai_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pydantic_getattr_calls() as seen:
        usage = OpenAIAdapter().usage(response)
    assert seen == []
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (
        1000, 500, 200, 50)
    assert usage.cache_write_tokens == 0 and usage.finish_reasons == ["stop"] and usage.response_id == response.id


def test_anthropic_usage_is_read_without_pydantic_getattr(anthropic_client: Any, srv: StandInServer) -> None:
    srv.reply = Reply(input_tokens=300, output_tokens=40, cached_tokens=100, cache_creation_tokens=50,
                      cache_creation_1h_tokens=20)
    message = anthropic_client.messages.create(model="claude-haiku-4-5", max_tokens=64,
                                               messages=[{"role": "user", "content": "x"}])
    with pydantic_getattr_calls() as seen:
        usage = AnthropicAdapter().usage(message)
    assert seen == []
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens) == (300, 40, 100)
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (30, 20)
    assert usage.response_id == message.id and usage.finish_reasons == [message.stop_reason]


def test_a_guarded_call_settles_without_pydantic_getattr(guard: tokenbudget.Guard, openai_client: Any,
                                                        srv: StandInServer) -> None:
    srv.reply = Reply(input_tokens=10, output_tokens=3)
    with pydantic_getattr_calls() as seen:
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    mine = [name for name in seen if name in ("input_tokens", "cache_write_tokens", "output_tokens", "status")]
    assert mine == []
    (event,) = guard.ledger.events()
    assert (event.input_tokens, event.output_tokens, event.status) == (10, 3, "ok")


class _Extra(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    known: int | None = None


class _OwnGetattr(pydantic.BaseModel):
    def __getattr__(self, name: str) -> Any:
        if name == "computed":
            return 7
        raise AttributeError(name)


class _Plain:
    def __init__(self) -> None:
        self.attr = 3

    @property
    def prop(self) -> int:
        return 4


@pytest.mark.parametrize(
    ("obj", "name", "expected"),
    [
        ({"a": 1}, "a", 1), ({"a": 1}, "b", None), (None, "a", None),
        (_Extra(known=5), "known", 5), (_Extra(), "known", None), (_Extra(), "absent", None),
        (_Extra.model_validate({"surprise": 9}), "surprise", 9),
        (_OwnGetattr(), "computed", 7), (_OwnGetattr(), "absent", None),
        (_Plain(), "attr", 3), (_Plain(), "prop", 4), (_Plain(), "absent", None),
    ],
)  # fmt: skip
def test_field_of_reads_like_getattr_with_a_none_default(obj: Any, name: str, expected: Any) -> None:
    assert field_of(obj, name) == expected == (obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None))
