"""Pre-call estimation: ``Estimator().input_tokens(CallRequest(...))`` on big prompts and on a growing agent chat.

* ``fresh``: a new Estimator (empty cache) per measurement, so the whole prompt is tokenized.
* ``repeated``: the same Estimator and the same prompt string object again (what an app that keeps its messages in
  a list sends): a cache hit.
* ``repeated, equal copy``: an equal but distinct string (as after a JSON round trip), so Python hashes and compares
  it again: still a cache hit, but O(length).
* agent: one conversation that grows by one message per call, 200 calls, one Estimator (as in a real process); the
  cost of call n against call 1.
* ``Guard._plan``: what the guard does with the same request before reserving (price lookup, the estimate and, for
  Anthropic, a scan for ``cache_control`` markers), to show costs outside the Estimator.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from typing import Any

from ._stats import median, summary_us

_WORDS = (  # noqa: SIM905 - a word list, easier to read as one string
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what no out up said about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came right used "
    "take three budget ledger reserve settle estimate tokenizer deployment latency throughput configuration request "
    "response stream export tenant database migration rollback incident timeout retry cache window policy"
).split()


def make_text(target_tokens: int, seed: int, count: Callable[[str], int]) -> str:
    """Deterministic English-like text of about ``target_tokens`` tokens (calibrated with the real tokenizer)."""
    rng = random.Random(seed)
    sample = " ".join(rng.choice(_WORDS) for _ in range(4000))
    per_word = count(sample) / 4000
    words = max(1, int(target_tokens / per_word))
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(words):
        w = rng.choice(_WORDS)
        out.append(w + ("." if i % 17 == 16 else ""))
    return " ".join(out)


def _request(model: str, api: str, messages: list[dict[str, Any]], system: str | None = None) -> Any:
    from tokenbudget.calls import CallRequest

    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 1024}
    if system is not None:
        if api == "anthropic":
            body["system"] = system
        else:
            body["messages"] = [{"role": "system", "content": system}, *messages]
    return CallRequest(provider=api, operation="chat", model=model, body=body, max_output_tokens=1024, api=api)


def _time(fn: Callable[[], Any]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def run(*, quick: bool) -> dict[str, Any]:
    from tokenbudget.estimate import Estimator

    model = "gpt-4o-mini"
    probe = Estimator()
    rows: list[dict[str, Any]] = []
    sizes = (1_000, 10_000, 100_000, 1_000_000)
    fresh_reps = {1_000: 30, 10_000: 15, 100_000: 5, 1_000_000: 3}
    if quick:
        fresh_reps = {1_000: 3, 10_000: 2, 100_000: 1, 1_000_000: 1}
    repeat_reps = 5 if quick else 50
    texts = {n: make_text(n, seed=n, count=lambda t: probe.text_tokens(model, t)) for n in sizes}
    ratios: dict[int, float] = {}
    for n in sizes:
        text = texts[n]
        tokens = probe.text_tokens(model, text)
        req = _request(model, "openai", [{"role": "user", "content": text}])
        gc.collect()
        fresh = [_time(lambda: Estimator().input_tokens(req)) for _ in range(fresh_reps[n])]  # noqa: B023
        warm = Estimator()
        warm.input_tokens(req)
        same = [_time(lambda: warm.input_tokens(req)) for _ in range(repeat_reps)]  # noqa: B023
        copies: list[int] = []
        for _ in range(min(repeat_reps, 10 if n >= 1_000_000 else repeat_reps)):
            copy_req = _request(model, "openai", [{"role": "user", "content": (text + " ")[:-1]}])
            copies.append(_time(lambda: warm.input_tokens(copy_req)))  # noqa: B023 - used at once
        fresh_s, same_s, copy_s = summary_us(fresh), summary_us(same), summary_us(copies)
        ratios[n] = same_s["median_us"] / fresh_s["median_us"]
        label = f"{n // 1000}k" if n < 1_000_000 else "1M"
        rows.append({"name": f"{label}-token prompt, fresh", "tokens": tokens, "chars": len(text), **fresh_s})
        rows.append({"name": f"{label}-token prompt, repeated", "tokens": tokens, **same_s,
                     "ratio_to_fresh": ratios[n]})
        rows.append({"name": f"{label}-token prompt, repeated (equal copy)", "tokens": tokens, **copy_s,
                     "ratio_to_fresh": copy_s["median_us"] / fresh_s["median_us"]})

    rows.extend(_guard_plan_rows(texts[1_000_000], repeat_reps))
    agent = _agent(reps=2 if quick else 7, turns=200)
    agent_plan = _agent_plan(reps=1 if quick else 3, turns=200)
    return {"rows": rows, "agent": agent, "agent_plan": agent_plan, "repeated_1m_ratio": ratios[1_000_000]}


def _guard_plan_rows(text: str, reps: int) -> list[dict[str, Any]]:
    """``Guard._plan`` on the repeated 1M-token prompt: the estimate plus what the guard adds around it."""
    import tokenbudget

    rows: list[dict[str, Any]] = []
    guard = tokenbudget.Guard(tokenbudget.Settings(ledger="memory://"))
    try:
        plan = guard._plan
    except AttributeError:  # the guard's internals moved: nothing to compare
        return rows
    for api, model in (("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")):
        req = _request(model, api, [{"role": "user", "content": text}])
        plan(req)
        times = [_time(lambda: plan(req)) for _ in range(reps)]  # noqa: B023
        est = [_time(lambda: guard.estimator.input_tokens(req)) for _ in range(reps)]  # noqa: B023
        rows.append({"name": f"1M-token prompt, repeated, Guard._plan ({api})", **summary_us(times),
                     "estimator_only_median_us": summary_us(est)["median_us"]})
    guard.close()
    return rows


def _agent_plan(*, reps: int, turns: int) -> dict[str, Any]:
    """The same growing conversation through ``Guard._plan`` (what the guard really runs before reserving), for each
    wire protocol: shows work outside the Estimator that also grows with the history."""
    import tokenbudget
    from tokenbudget.estimate import Estimator

    probe = Estimator()
    out: dict[str, Any] = {}
    for api, model in (("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")):
        per_call: list[list[int]] = [[] for _ in range(turns)]
        for rep in range(reps):
            guard = tokenbudget.Guard(tokenbudget.Settings(ledger="memory://"))
            plan = getattr(guard, "_plan", None)
            if plan is None:
                return out
            plan(_request(model, api, [{"role": "user", "content": "warm the price table"}]))
            texts = [make_text(150, seed=20_000 * rep + i, count=lambda t: probe.text_tokens("gpt-4o-mini", t))
                     for i in range(turns)]
            history: list[dict[str, Any]] = []
            gc.collect()
            for i in range(turns):
                history.append({"role": "user" if i % 2 == 0 else "assistant", "content": texts[i]})
                req = _request(model, api, list(history), system="You are a careful coding agent.")
                per_call[i].append(_time(lambda: plan(req)))  # noqa: B023
            guard.close()
        med = [median(x) / 1000.0 for x in per_call]
        out[api] = {"call1_us": med[0], "median_us": med[-1], "ratio_last_to_first": med[-1] / med[0]}
    return out


def _agent(*, reps: int, turns: int) -> dict[str, Any]:
    """A 200-turn agent loop: each call sends the whole history plus one new message, through one Estimator."""
    from tokenbudget.estimate import Estimator

    model = "gpt-4o-mini"
    probe = Estimator()
    system = "You are a careful coding agent. Use the tools you are given; explain each change in one sentence."
    per_call: list[list[int]] = [[] for _ in range(turns)]
    for rep in range(reps):
        est = Estimator()
        history: list[dict[str, Any]] = []
        texts = [make_text(150, seed=10_000 * rep + i, count=lambda t: probe.text_tokens(model, t))
                 for i in range(turns)]
        gc.collect()
        for i in range(turns):
            history.append({"role": "user" if i % 2 == 0 else "assistant", "content": texts[i]})
            req = _request(model, "openai", list(history), system=system)
            per_call[i].append(_time(lambda: est.input_tokens(req)))  # noqa: B023
    med = [median(x) / 1000.0 for x in per_call]
    first = med[0]
    points = {n: med[n - 1] for n in (1, 2, 10, 50, 100, 150, 200) if n <= turns}
    return {
        "turns": turns,
        "reps": reps,
        "call_us": {str(k): v for k, v in points.items()},
        "median_us": med[-1],
        "call1_us": first,
        "ratio_last_to_first": med[-1] / first if first else float("nan"),
        "tokens_per_message": 150,
    }
