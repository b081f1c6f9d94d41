"""Input-token estimates made before a request leaves, so the guard can reserve money for it.

The vendor reports the exact count only after the call; the reservation needs a number now, on the hot path of every
call. Every figure below is either exact (OpenAI text, via ``tiktoken``) or a stated approximation with its source.
Estimates lean high where the sources give a range, because under-reserving lets a budget be overspent.

Tokenizers
    OpenAI models use their own ``tiktoken`` encoding: ``o200k_base`` for gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*,
    o1*/o3*/o4*, chatgpt-4o* and gpt-oss (``o200k_harmony`` differs from ``o200k_base`` only in special tokens, which
    are never produced here); ``cl100k_base`` for gpt-4 (non-o), gpt-3.5*, text-embedding-3*, text-embedding-ada-002,
    davinci-002/babbage-002. ``tiktoken.encoding_name_for_model`` decides where it knows the model, then a prefix
    table; retired models it maps to r50k/p50k/gpt2 are counted with ``cl100k_base`` (those encodings are not cached
    offline and the models cannot be called any more). Unknown OpenAI-compatible or in-house models use
    ``o200k_base``. A provider prefix (``openai/gpt-4o``) is ignored. Text is encoded as ordinary text (special-token
    strings such as ``<|endoftext|>`` count as the text they are), lone surrogates are replaced first.

    Texts longer than 8,192 characters are encoded in chunks, cut just before a space that sits between two
    non-space characters: no pre-token of ``cl100k_base``/``o200k_base`` crosses such a point, so the count is exact.
    Only a run of 4,096+ characters with no such space (base64, a line of one repeated character) is cut hard, which
    can move the count by a token per cut. Chunking bounds memory and time, and avoids a tiktoken panic (a
    ``BaseException``) on about a million consecutive spaces.

Claude (``claude*`` models, or any request on the Anthropic wire protocol)
    Claude's tokenizer is not public; Anthropic's exact answer, ``POST /v1/messages/count_tokens``, costs a network
    round trip per call. Text is therefore counted with ``cl100k_base`` and multiplied by ``CLAUDE_FACTOR`` = 1.10,
    rounded up: side-by-side counts put Claude 3/4 at roughly 5-20 % more tokens than ``cl100k_base`` for English
    prose and code, and 1.10 is the factor commonly used for this. The factor applies to text only, not to the
    image, document and fixed overheads below.

Chat messages (OpenAI)
    OpenAI cookbook, "How to count tokens with tiktoken" (``num_tokens_from_messages``): 3 tokens per message, every
    string field of a message counted (role, content, name, ...), +1 when ``name`` is present, +3 once for the reply
    priming (``<|start|>assistant<|message|>``). Assistant ``tool_calls``/``function_call`` count the function name and
    the arguments text. The same per-item overhead is used for Responses API input messages.

Tool and schema definitions
    Each tool/function definition is serialised to compact JSON and counted, plus ``OPENAI_TOKENS_PER_TOOL`` = 10
    per tool and ``OPENAI_TOOLS_END`` = 12 once (cookbook ``num_tokens_for_tools``: 7-10 per function, 12 at the
    end). OpenAI renders schemas in a terser TypeScript-like form, so JSON over-counts a little. A ``json_schema``
    response format is counted the same way (without the per-tool overhead). Anthropic bills a tool-use system
    prompt when ``tools`` is non-empty: ``CLAUDE_TOOLS_SYSTEM_PROMPT`` = 346 tokens, the largest figure on
    Anthropic's tool-use pricing page.

Images (OpenAI, "Images and vision" - calculating costs)
    ``detail: low`` costs 85. ``high``/``auto`` (and any unknown detail) cost 85 + 170 per 512 px tile, after
    scaling to fit in 2048x2048 and then so that the shortest side is at most 768 px. gpt-4o-mini bills 2833 + 5667
    per tile (the same money as gpt-4o at its lower price). gpt-4.1-mini/-nano, gpt-5-mini/-nano and o4-mini bill
    32 px patches (at most 1536, scaling down as documented) times 1.62 / 2.46 / 1.62 / 2.46 / 1.72, whatever the
    detail. Width and height are read from the PNG/JPEG/GIF/WEBP header of a ``data:`` URL without decoding the
    image; a remote URL, a ``file_id`` or an unreadable header is assumed to be 1024x1024 (765 tokens at high detail).
    Other models priced per tile (o1/o3 at 75/150, gpt-5 at 70/140) are counted at 85/170, a slight over-estimate.

Images (Anthropic, "Vision" docs)
    tokens = width * height / 750 after scaling so the long edge is at most 1568 px, capped at 1600 (Anthropic
    scales images above about 1.15 megapixels down to that). URL and file sources count 1600, the cap.

Audio
    OpenAI documents about 10 tokens per second of input audio (1 per 100 ms). Duration comes from the WAV header's
    byte rate, or assumes 16 kB/s (128 kbit/s MP3) for other formats; audio without inline data counts 300 (30 s).

Documents and files
    PDFs cost text plus an image per page: Anthropic documents 1,500-3,000 tokens per page; ``PDF_TOKENS_PER_PAGE``
    = 3,000 (the top of that range). Pages are counted from ``/Type /Page`` objects in the decoded bytes, else
    ``/Count``, else one page per 100 kB (compressed object streams hide both). Non-PDF inline files count as text at
    3.5 bytes per token. A file referenced by id or URL, whose size is unknown here, counts ``UNKNOWN_FILE_TOKENS`` =
    10,000. Plain-text and ``content`` document sources are counted as text.

Anthropic messages
    3 tokens per message and 3 per request (role markers and reply priming; Anthropic does not document these, they
    are small next to the text factor). Thinking blocks are counted in full (an upper bound: the API drops thinking
    from earlier turns); redacted thinking and encrypted reasoning count one token per 4 characters of ciphertext.

Not counted
    Conversation state held by the server (``previous_response_id``, ``conversation``, ``item_reference``) and
    earlier audio replies referenced by id: their size is unknown to the client, so such calls are under-estimated.

No encoding available
    If a tiktoken encoding cannot be loaded (no cache and no network, or loading takes more than 15 s), counts fall
    back to ceil(UTF-8 bytes / 3.5) and one warning is logged on ``tokenbudget.estimate``, once per process. Loading is
    retried in the background every 5 minutes. ``TIKTOKEN_CACHE_DIR`` points tiktoken at a directory of cached
    encodings for offline use.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import math
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from functools import lru_cache
from itertools import chain
from operator import is_
from typing import Any, Final, Protocol

from tokenbudget.calls import CallRequest
from tokenbudget.errors import ConfigError

__all__ = ["Estimator"]

logger = logging.getLogger("tokenbudget.estimate")

O200K: Final = "o200k_base"
CL100K: Final = "cl100k_base"
APPROX: Final = "approx"

CLAUDE_FACTOR: Final = 1.10
_CLAUDE_NUM, _CLAUDE_DEN = 11, 10  # integer form of CLAUDE_FACTOR: 10 * 1.1 is 11.000000000000002 in floats
APPROX_BYTES_PER_TOKEN: Final = 3.5

OPENAI_TOKENS_PER_MESSAGE: Final = 3
OPENAI_TOKENS_PER_NAME: Final = 1
OPENAI_REPLY_PRIMING: Final = 3
OPENAI_TOKENS_PER_TOOL: Final = 10
OPENAI_TOOLS_END: Final = 12

IMAGE_BASE_TOKENS: Final = 85
IMAGE_TILE_TOKENS: Final = 170
GPT4O_MINI_IMAGE_BASE: Final = 2833
GPT4O_MINI_IMAGE_TILE: Final = 5667
DEFAULT_IMAGE_SIZE: Final = (1024, 1024)
IMAGE_PATCH_CAP: Final = 1536
# model prefix -> multiplier in hundredths (integer maths keeps ceil() honest)
_PATCH_MULTIPLIERS: Final = (
    ("gpt-4.1-mini", 162),
    ("gpt-4.1-nano", 246),
    ("gpt-5-mini", 162),
    ("gpt-5-nano", 246),
    ("o4-mini", 172),
)

AUDIO_TOKENS_PER_SECOND: Final = 10
AUDIO_DEFAULT_BYTES_PER_SECOND: Final = 16_000
AUDIO_UNKNOWN_TOKENS: Final = 300

PDF_TOKENS_PER_PAGE: Final = 3_000
PDF_BYTES_PER_PAGE_FALLBACK: Final = 100_000
UNKNOWN_FILE_TOKENS: Final = 10_000
OPAQUE_CHARS_PER_TOKEN: Final = 4

CLAUDE_IMAGE_PIXELS_PER_TOKEN: Final = 750
CLAUDE_IMAGE_MAX_EDGE: Final = 1568
CLAUDE_IMAGE_MAX_TOKENS: Final = 1600
CLAUDE_TOKENS_PER_MESSAGE: Final = 3
CLAUDE_REQUEST_OVERHEAD: Final = 3
CLAUDE_TOOLS_SYSTEM_PROMPT: Final = 346

CHUNK_CHARS: Final = 8192
CACHE_ENTRY_OVERHEAD_CHARS: Final = 64
"""Charged per cache entry on top of its length, so a flood of tiny strings is bounded too."""
PROMOTE_CHARS: Final = 1024
"""Cache hits on texts at least this long move the entry to the recent end (LRU); shorter entries age first-in,
first-out, which spares a ``move_to_end`` per role name and short message (re-encoding one costs a few µs)."""
PREFIX_MIN_MESSAGES: Final = 8
"""Shorter message lists are counted in full: remembering them costs more than it saves."""
PREFIX_SLOTS: Final = 16
"""Growing conversations remembered per Estimator (told apart by the identity of their first two messages' values)."""
LOAD_WAIT_SECONDS: Final = 15.0
LOAD_RETRY_SECONDS: Final = 300.0


# --------------------------------------------------------------------------------------------------------------------
# Encodings: loaded lazily, once per process, in a worker thread so a hung download cannot stall calls forever.


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def _tiktoken_loader(name: str) -> _Encoder:
    import tiktoken

    encoder: _Encoder = tiktoken.get_encoding(name)
    return encoder


class _Slot:
    __slots__ = ("deadline", "done", "encoder", "error", "failed_at", "thread")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.done = threading.Event()
        self.encoder: _Encoder | None = None
        self.error: BaseException | None = None
        self.failed_at = 0.0
        self.thread: threading.Thread | None = None


class _EncodingRegistry:
    """Process-wide, because an encoding is tens of megabytes and every Estimator wants the same ones."""

    def __init__(
        self,
        loader: Callable[[str], _Encoder] = _tiktoken_loader,
        *,
        wait_seconds: float = LOAD_WAIT_SECONDS,
        retry_seconds: float = LOAD_RETRY_SECONDS,
    ) -> None:
        self._loader = loader
        self._wait = wait_seconds
        self._retry = retry_seconds
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._warned = False

    def get(self, name: str) -> _Encoder | None:
        slot = self._slots.get(name)
        if slot is not None and slot.encoder is not None:
            return slot.encoder
        with self._lock:
            slot = self._slots.get(name)
            now = time.monotonic()
            if slot is None:
                slot = self._start(name, deadline=now + self._wait)
            elif slot.encoder is None and (
                (slot.done.is_set() and now - slot.failed_at >= self._retry)
                or (not slot.done.is_set() and (slot.thread is None or not slot.thread.is_alive()))  # lost in fork()
            ):
                slot = self._start(name, deadline=now)  # retries happen in the background, never stalling a call
        remaining = slot.deadline - time.monotonic()
        if remaining > 0 and not slot.done.is_set():
            slot.done.wait(remaining)
        if slot.encoder is not None:
            return slot.encoder
        self._warn_once(name, slot)
        return None

    def would_wait(self, name: str) -> bool:
        """Whether :meth:`get` would block now: never loaded, or loading with its first wait not yet over."""
        slot = self._slots.get(name)
        if slot is None:
            return True
        if slot.encoder is not None or slot.done.is_set():
            return False
        return slot.deadline > time.monotonic()

    def preload(self, name: str) -> None:
        """Start loading ``name`` in the background unless it is loaded, loading, or failed less than the retry
        interval ago; never waits and never warns (a later ``get`` does both as usual)."""
        with self._lock:
            slot = self._slots.get(name)
            now = time.monotonic()
            if slot is None:
                self._start(name, deadline=now + self._wait)
            elif slot.encoder is None and (
                (slot.done.is_set() and now - slot.failed_at >= self._retry)
                or (not slot.done.is_set() and (slot.thread is None or not slot.thread.is_alive()))
            ):
                self._start(name, deadline=now)

    def _start(self, name: str, *, deadline: float) -> _Slot:
        slot = _Slot(deadline)
        self._slots[name] = slot
        slot.thread = threading.Thread(target=self._load, args=(name, slot), name=f"tokenbudget-{name}", daemon=True)
        slot.thread.start()
        return slot

    def _load(self, name: str, slot: _Slot) -> None:
        try:
            slot.encoder = self._loader(name)
        except BaseException as exc:  # any failure, pyo3 panics included, means "estimate instead"
            slot.error = exc
            slot.failed_at = time.monotonic()
        finally:
            slot.done.set()

    def _warn_once(self, name: str, slot: _Slot) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        why = f"{type(slot.error).__name__}: {slot.error}" if slot.error is not None else "still loading"
        logger.warning(
            "tokenbudget: cannot load tiktoken encoding %r (%s); input tokens are estimated as ceil(UTF-8 bytes / %s) "
            "until it loads. Point TIKTOKEN_CACHE_DIR at a directory holding the cached encoding for exact counts. "
            "This warning is logged once.",
            name,
            why,
            APPROX_BYTES_PER_TOKEN,
        )


_REGISTRY = _EncodingRegistry()


# --------------------------------------------------------------------------------------------------------------------
# Models


def _norm_model(model: object) -> str:
    text = model if isinstance(model, str) else ("" if model is None else str(model))
    text = text.strip().lower()
    return text.rsplit("/", 1)[-1] if "/" in text else text


def _is_claude(model: str) -> bool:
    return "claude" in model


_PREFIX_ENCODINGS: Final = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("gpt-oss", O200K),
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("gpt-35", CL100K),
    ("text-embedding-3", CL100K),
    ("text-embedding-ada-002", CL100K),
    ("davinci-002", CL100K),
    ("babbage-002", CL100K),
)


@lru_cache(maxsize=4096)
def _model_encoding(model: str) -> str:
    """Encoding for a normalised model name; Claude gets ``cl100k_base`` (scaled later by the Claude factor)."""
    if _is_claude(model):
        return CL100K
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = None
    if name is not None:
        if name.startswith("o200k"):
            return O200K
        return CL100K  # cl100k_base itself, or a retired encoding (see module docstring)
    for prefix, encoding in _PREFIX_ENCODINGS:
        if model.startswith(prefix):
            return encoding
    return O200K


@lru_cache(maxsize=4096)
def _image_scheme(model: str) -> tuple[str, int, int]:
    """("claude"|"patch"|"tile", a, b): patch multiplier in hundredths, or tile base/per-tile tokens."""
    if _is_claude(model):
        return ("claude", 0, 0)
    bare = model.removeprefix("ft:")
    for prefix, hundredths in _PATCH_MULTIPLIERS:
        if bare.startswith(prefix):
            return ("patch", hundredths, 0)
    if bare.startswith("gpt-4o-mini"):
        return ("tile", GPT4O_MINI_IMAGE_BASE, GPT4O_MINI_IMAGE_TILE)
    return ("tile", IMAGE_BASE_TOKENS, IMAGE_TILE_TOKENS)


# --------------------------------------------------------------------------------------------------------------------
# Text


def _approx_tokens(text: str) -> int:
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (2 * size + 6) // 7  # ceil(bytes / 3.5)


_ROLES: Final = ("user", "assistant", "system", "developer", "tool", "function")
_ROLE_TOKENS: Final[dict[str, dict[str, int]]] = {
    O200K: dict.fromkeys(_ROLES, 1),  # each role name is one token in both encodings (asserted by the tests)
    CL100K: dict.fromkeys(_ROLES, 1),
}
_APPROX_ROLE_TOKENS: Final = {role: _approx_tokens(role) for role in _ROLES}
_OPENAI_FAST_KEYS: Final = frozenset(("role", "content", "name"))
_NOT_CHAT: Final = frozenset(("embeddings", "text_completion"))


def _encode_piece(encoder: _Encoder, text: str) -> int:
    try:
        return len(encoder.encode_ordinary(text))
    except Exception:
        return _approx_tokens(text)
    except BaseException as exc:  # tiktoken's Rust panics surface as pyo3_runtime.PanicException(BaseException)
        if type(exc).__name__ == "PanicException":
            return _approx_tokens(text)
        raise


def _cut(text: str, start: int, end: int) -> int:
    low = start + CHUNK_CHARS // 2
    j = text.rfind(" ", low, end)
    while j > low:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        j = text.rfind(" ", low, j)
    return end


def _encode_len(encoder: _Encoder, text: str) -> int:
    size = len(text)
    if size <= CHUNK_CHARS:
        return _encode_piece(encoder, text)
    total = 0
    start = 0
    while size - start > CHUNK_CHARS:
        cut = _cut(text, start, start + CHUNK_CHARS)
        total += _encode_piece(encoder, text[start:cut])
        start = cut
    return total + _encode_piece(encoder, text[start:])


def _json_default(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    if callable(dump) and not isinstance(obj, type):
        try:
            return dump()
        except Exception:
            pass
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    try:
        return str(obj)
    except Exception:
        return f"<{type(obj).__name__}>"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    except Exception:  # circular references, non-string keys, a __str__ that raises, ...
        try:
            return repr(value)
        except Exception:
            return ""


def _absent(value: Any) -> bool:
    return value is None or type(value).__name__ in ("NotGiven", "Omit")


def _as_text(value: Any) -> str:
    """Whatever a caller put where text belongs, as the text the model would most plausibly see."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)  # exact str: subclasses may override hashing/equality used by the cache
    if _absent(value):
        return ""
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return _json(value)


def _plain(value: Any) -> Any:
    """Turn SDK objects (pydantic models, mappings) into the dict a walker expects; leave everything else alone."""
    if isinstance(value, (dict, list, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        try:
            return dict(value)
        except Exception:
            return value
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        try:
            return dump()
        except Exception:
            return value
    return value


def _items(value: Any) -> list[Any] | None:
    """Elements of a re-iterable collection; one-shot iterators are never consumed (the SDK still has to send them)."""
    if isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (str, bytes, bytearray, Mapping)) or _absent(value):
        return None
    if isinstance(value, Collection):
        try:
            return list(value)
        except Exception:
            return None
    return None


def _as_list(value: Any) -> list[Any] | None:
    """Like ``_items``, but a lone scalar or mapping where a list belongs becomes a one-element list.

    ``None`` means literally nothing countable: the value is missing, ``None``, or a one-shot iterator.
    """
    items = _items(value)
    if items is not None:
        return items
    if _absent(value) or isinstance(value, Iterator):
        return None
    return [value]


# --------------------------------------------------------------------------------------------------------------------
# Images, audio, files


_NEED_MORE: Final = (-1, -1)
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _image_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image header, ``None`` if unknown, ``_NEED_MORE`` if the header is cut short."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) < 24:
            return _NEED_MORE
        if data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return _sane(width, height)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            return _NEED_MORE
        width, height = struct.unpack("<HH", data[6:10])
        return _sane(width, height)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_dims(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dims(data)
    if len(data) < 12:
        return _NEED_MORE
    return None


def _sane(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _webp_dims(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if len(data) < (25 if chunk == b"VP8L" else 30):
        return _NEED_MORE
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return _sane(width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return _sane((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        return _sane(int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    return None


def _jpeg_dims(data: bytes) -> tuple[int, int] | None:
    i = 2
    size = len(data)
    while i + 4 <= size:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > size:
                return _NEED_MORE
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return _sane(width, height)
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return _NEED_MORE


_URLSAFE: Final = str.maketrans("-_", "+/")


def _b64_prefix(text: str, start: int, chars: int) -> bytes | None:
    chunk = text[start : start + chars]
    if "-" in chunk or "_" in chunk:
        chunk = chunk.translate(_URLSAFE)
    if start + chars < len(text):
        chunk = chunk[: len(chunk) - len(chunk) % 4]
    else:
        chunk += "=" * (-len(chunk) % 4)
    try:
        return binascii.a2b_base64(chunk)
    except (binascii.Error, ValueError):
        return None


def _b64_image_dims(text: str, start: int) -> tuple[int, int] | None:
    """Reads only as much of the base64 payload as the header needs (JPEG EXIF can push it past 64 kB)."""
    chars = 64
    total = len(text) - start
    while True:
        data = _b64_prefix(text, start, chars)
        if data is None:
            return None
        dims = _image_dims(data)
        if dims is not _NEED_MORE:
            return dims
        if chars >= total:
            return None
        chars *= 4


def _data_url(value: str) -> tuple[str, int] | None:
    """(media type, offset of the base64 payload) of a ``data:...;base64,`` URL."""
    if not value.startswith("data:"):
        return None
    comma = value.find(",", 5, 512)
    if comma < 0:
        return None
    header = value[5:comma].lower()
    if ";base64" not in header:
        return None
    return header.split(";", 1)[0], comma + 1


def _b64_size(text: str, start: int) -> int:
    chars = len(text) - start
    return max(0, chars * 3 // 4 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0))


def _tile_tokens(width: int, height: int, base: int, per_tile: int) -> int:
    if max(width, height) > 2048:
        longest = max(width, height)
        width, height = max(1, width * 2048 // longest), max(1, height * 2048 // longest)
    if min(width, height) > 768:
        shortest = min(width, height)
        width, height = width * 768 // shortest, height * 768 // shortest
    return base + per_tile * (-(-width // 512)) * (-(-height // 512))


def _patch_count(width: int, height: int) -> int:
    patches = (-(-width // 32)) * (-(-height // 32))
    if patches <= IMAGE_PATCH_CAP:
        return patches
    ratio = math.sqrt(32 * 32 * IMAGE_PATCH_CAP / (width * height))
    ratio *= min(
        math.floor(width * ratio / 32) / (width * ratio / 32),
        math.floor(height * ratio / 32) / (height * ratio / 32),
    )
    patches = math.ceil(width * ratio / 32) * math.ceil(height * ratio / 32)
    return min(patches, IMAGE_PATCH_CAP)


def _claude_image_tokens(dims: tuple[int, int] | None) -> int:
    if dims is None:
        return CLAUDE_IMAGE_MAX_TOKENS
    width, height = dims
    longest = max(width, height)
    if longest > CLAUDE_IMAGE_MAX_EDGE:
        width, height = (
            max(1, width * CLAUDE_IMAGE_MAX_EDGE // longest),
            max(1, height * CLAUDE_IMAGE_MAX_EDGE // longest),
        )
    return min(-(-(width * height) // CLAUDE_IMAGE_PIXELS_PER_TOKEN), CLAUDE_IMAGE_MAX_TOKENS)


def _image_tokens(model: str, url: Any, detail: Any) -> int:
    dims: tuple[int, int] | None = None
    if isinstance(url, str):
        parsed = _data_url(url)
        if parsed is not None:
            dims = _b64_image_dims(url, parsed[1])
    scheme, a, b = _image_scheme(model)
    if scheme == "claude":
        return _claude_image_tokens(dims)
    width, height = dims or DEFAULT_IMAGE_SIZE
    if scheme == "patch":
        return (_patch_count(width, height) * a + 99) // 100
    if isinstance(detail, str) and detail.lower() == "low":
        return a
    return _tile_tokens(width, height, a, b)


def _audio_tokens(audio: Any) -> int:
    audio = _plain(audio)
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str) or not data:
        return AUDIO_UNKNOWN_TOKENS
    start = 0
    parsed = _data_url(data)
    if parsed is not None:
        start = parsed[1]
    size = _b64_size(data, start)
    rate = AUDIO_DEFAULT_BYTES_PER_SECOND
    head = _b64_prefix(data, start, 64)
    if head is not None and head[:4] == b"RIFF" and head[8:12] == b"WAVE" and len(head) >= 32:
        (byte_rate,) = struct.unpack("<I", head[28:32])
        if byte_rate > 0:
            rate = byte_rate
    return -(-size * AUDIO_TOKENS_PER_SECOND // rate)


_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PDF_COUNT = re.compile(rb"/Count\s+(\d{1,7})")


def _pdf_pages(data: bytes) -> int:
    pages = len(_PDF_PAGE.findall(data))
    if pages:
        return pages
    counts = [int(m) for m in _PDF_COUNT.findall(data)]
    if counts and max(counts) > 0:
        return max(counts)
    return max(1, -(-len(data) // PDF_BYTES_PER_PAGE_FALLBACK))


def _opaque_tokens(value: Any) -> int:
    return -(-len(value) // OPAQUE_CHARS_PER_TOKEN) if isinstance(value, str) else 0


# --------------------------------------------------------------------------------------------------------------------
# Walking request bodies


class _Tally:
    """Texts to tokenize (scaled for Claude) and fixed token counts (overheads, images, files) of one request."""

    __slots__ = ("fixed", "found", "model", "texts")

    def __init__(self, model: str) -> None:
        self.model = model
        self.texts: list[str] = []
        self.fixed = 0
        self.found = False

    def text(self, value: Any) -> None:
        text = value if type(value) is str else _as_text(value)
        if text:
            self.texts.append(text)


class _Prefix:
    """The messages of a previous chat request and what they counted, to reuse when the next request extends them.

    ``copies`` are shallow copies of the messages as they were counted: a later request's leading messages compare
    equal to them (same keys; each value the same object, or an equal one, which counts the same) exactly when they
    are unchanged, so a message mutated in place is noticed. The comparison is a C-level list/dict ``==``, a few
    nanoseconds per message. ``blocks`` holds the single text block of Anthropic messages whose content is a list
    (a block edited in place leaves its list the same object), compared by identity.
    """

    __slots__ = ("blocks", "copies", "fixed", "hits", "text")

    def __init__(
        self,
        copies: list[dict[str, Any]],
        blocks: list[tuple[int, list[Any], dict[str, Any], list[Any], list[Any]]],
        text: int,
        fixed: int,
        hits: int,
    ) -> None:
        self.copies = copies
        self.blocks = blocks
        self.text = text
        self.fixed = fixed
        self.hits = hits

    def extended_by(self, messages: list[Any]) -> bool:
        """Whether ``messages`` starts with these messages, unchanged."""
        size = len(self.copies)
        if len(messages) < size:
            return False
        head = messages[:size]
        if list(map(type, head)) != [dict] * size or head != self.copies:
            return False
        for index, content, block, block_keys, block_values in self.blocks:
            if head[index].get("content") is not content or len(content) != 1 or content[0] is not block:
                return False
            if len(block) != len(block_keys) or not all(map(is_, block, block_keys)):
                return False
            if not all(map(is_, block.values(), block_values)):
                return False
        return True


class Estimator:
    """Input-token estimates for the guard's reservations; one instance may be shared by every thread.

    Each distinct text is tokenized once and remembered in a bounded cache keyed by (encoding, text), so an agent whose
    conversation grows by one message per call pays only for the new message. ``cache_chars`` bounds the total length
    of remembered texts (plus 64 per entry); 0 disables the cache (and the fast paths below: every text is tokenized).
    Eviction is oldest first; a hit refreshes an entry only for texts of ``PROMOTE_CHARS`` or more (short ones are
    cheap to encode again, and refreshing costs a ``move_to_end`` per lookup).

    Plain chat requests (OpenAI messages of string ``role``/``content``/``name``; Anthropic messages of string content
    or one text block, with a string ``system``) skip the generic walker: role names count as known constants, and
    when a request's messages start with the messages of a recent request, unchanged (compared with copies taken
    then, so a message changed in place is noticed), the count of that prefix is reused and only the new messages
    are looked at.

    ``encode_calls``, ``encoded_chars``, ``cache_hits`` and ``cache_misses`` count the work done, for tests and
    diagnostics; they only ever grow. ``cache_hits`` counts texts whose tokens came from memory instead of the
    tokenizer (cache hits, role-name constants, texts of a reused prefix); ``cache_lookups`` counts the cache lookups
    actually made.
    """

    def __init__(self, *, cache_chars: int = 64_000_000) -> None:
        if isinstance(cache_chars, bool) or not isinstance(cache_chars, int) or cache_chars < 0:
            raise ConfigError(f"must be a non-negative int, got {cache_chars!r}", key="cache_chars", source="Estimator")
        self._budget = cache_chars
        self._cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.encode_calls = 0
        self.encoded_chars = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_lookups = 0
        self._prefixes: dict[tuple[Any, ...], _Prefix] = {}

    # ---------------------------------------------------------------------------------------------------------------
    # public API

    def encoding_name(self, model: str) -> str:
        """``"o200k_base"``/``"cl100k_base"``, or ``"approx"`` when that encoding cannot be loaded.

        Claude models report ``"cl100k_base"``: that is what their text is counted with before ``CLAUDE_FACTOR``.
        """
        name = _model_encoding(_norm_model(model))
        return name if _REGISTRY.get(name) is not None else APPROX

    async def await_encoding(self, model: str) -> None:
        """Let an async caller wait for ``model``'s encoding off its event loop.

        The first estimate waits for tiktoken to load the encoding (about a quarter of a second from a cache, up to
        ``LOAD_WAIT_SECONDS`` when it must be fetched): in a thread here, so the event loop keeps serving other tasks,
        and the estimate that follows finds it loaded (or failed, and estimates without it). Free once loaded.
        """
        name = _model_encoding(_norm_model(model))
        if _REGISTRY.would_wait(name):
            await asyncio.to_thread(_REGISTRY.get, name)

    def preload(self, models: Iterable[str] = ("gpt-4o", "claude-sonnet-4-6")) -> None:
        """Start loading the encodings ``models`` need, in the background; returns at once, does nothing more when
        they are loaded or loading already. Without network or cache the usual fallback (and its single warning, at
        the first estimate) applies."""
        names = [models] if isinstance(models, str) else [m for m in models if isinstance(m, str)]
        if names:
            threading.Thread(target=_preload, args=(names,), name="tokenbudget-preload", daemon=True).start()

    def text_tokens(self, model: str, text: str) -> int:
        """Tokens in generated text (an abandoned stream's output), which the vendor will never report.

        Not cached: output text is almost never seen twice, and caching it would only evict prompt texts.
        """
        norm = _norm_model(model)
        value = text if type(text) is str else _as_text(text)
        if not value:
            return 0
        name = _model_encoding(norm)
        encoder = _REGISTRY.get(name)
        count = _encode_len(encoder, value) if encoder is not None else _approx_tokens(value)
        if encoder is not None:
            with self._lock:
                self.encode_calls += 1
                self.encoded_chars += len(value)
        if _is_claude(norm):
            count = (count * _CLAUDE_NUM + _CLAUDE_DEN - 1) // _CLAUDE_DEN
        return count

    def input_tokens(self, request: CallRequest) -> int:
        """Estimated input tokens of ``request``; see the module docstring for every approximation.

        Odd input is counted as well as it can be rather than refused: pydantic models are dumped, tuples and other
        re-iterable collections are iterated, numbers and unknown objects are counted as their text or JSON, ``None``
        counts nothing. ``ConfigError`` is raised only when nothing at all is countable *and* the main field (named in
        the error: ``messages``, ``input``, ``prompt`` or ``body``) is missing or of an unusable type, e.g. ``None``, a
        number, or a one-shot iterator (never consumed here, since the SDK still has to send it).
        """
        body = request.body
        if type(body) is dict and self._budget:
            model = _norm_model(request.model)
            anthropic = request.api == "anthropic"
            if anthropic or (request.operation not in _NOT_CHAT and "messages" in body):
                fast = self._fast_chat(model, anthropic, body)
                if fast is not None:
                    return fast
        return self._input_tokens_generic(request)

    def _input_tokens_generic(self, request: CallRequest) -> int:
        """``input_tokens`` through the generic walker, whatever the request's shape."""
        model = _norm_model(request.model)
        anthropic = request.api == "anthropic"
        tally = _Tally(model)
        body = _plain(request.body)
        if isinstance(body, str):
            tally.found = True
            tally.text(body)
        elif not isinstance(body, dict):
            raise ConfigError(
                f"request body must be a dict, got {type(body).__name__}; nothing to count",
                key="body",
                source=_where(request),
            )
        elif anthropic:
            self._anthropic(tally, body, request)
        else:
            self._openai(tally, body, request)

        name = _model_encoding(model)
        encoder = _REGISTRY.get(name)
        text_tokens = self._count_texts(name, encoder, tally.texts)
        if anthropic or _is_claude(model):
            text_tokens = (text_tokens * _CLAUDE_NUM + _CLAUDE_DEN - 1) // _CLAUDE_DEN
        return text_tokens + tally.fixed

    # ---------------------------------------------------------------------------------------------------------------
    # fast path for plain chat requests

    def _fast_chat(self, model: str, anthropic: bool, body: dict[str, Any]) -> int | None:
        """``input_tokens`` of a plain chat request, or None when the request needs the generic walker."""
        messages = body.get("messages")
        if type(messages) is not list:
            return None
        tally = _Tally(model)
        tally.found = True
        if anthropic:
            system = body.get("system")
            if type(system) is str:
                tally.text(system)
            elif not _absent(system):
                return None
        name = _model_encoding(model)
        encoder = _REGISTRY.get(name)
        roles = _APPROX_ROLE_TOKENS if encoder is None else _ROLE_TOKENS[name]
        first = messages[:2]
        slot: tuple[Any, ...] | None = None
        if len(messages) >= PREFIX_MIN_MESSAGES and type(first[0]) is dict and type(first[1]) is dict:
            # a conversation is told by its first two messages' values (a shared system dict alone would not do)
            slot = (anthropic, name, encoder is None, *map(id, chain.from_iterable(map(dict.values, first))))
        prefix = self._prefixes.get(slot) if slot is not None else None
        if prefix is not None and prefix.extended_by(messages):
            start, copies = len(prefix.copies), prefix.copies
            text, fixed, hits, blocks = prefix.text, prefix.fixed, prefix.hits, list(prefix.blocks)
        else:
            start, copies, text, fixed, hits, blocks = 0, [], 0, 0, 0, []
        tail = messages[start:]
        texts: list[str] = []
        role_tokens = role_count = 0
        if anthropic:
            for index, message in enumerate(tail, start):
                if type(message) is not dict:
                    return None
                fixed += CLAUDE_TOKENS_PER_MESSAGE
                content = message.get("content")
                if type(content) is str:
                    if content:
                        texts.append(content)
                elif type(content) is list and len(content) == 1:
                    block = content[0]
                    if type(block) is not dict or block.get("type") != "text" or type(block.get("text")) is not str:
                        return None
                    if block["text"]:
                        texts.append(block["text"])
                    blocks.append((index, content, block, list(block), list(block.values())))
                elif content is not None:
                    return None
        else:
            for message in tail:
                if type(message) is not dict or not message.keys() <= _OPENAI_FAST_KEYS:
                    return None
                fixed += OPENAI_TOKENS_PER_MESSAGE
                role = message.get("role")
                if role is not None:
                    if type(role) is not str:
                        return None
                    known = roles.get(role)
                    if known is not None:
                        role_tokens += known
                        role_count += 1
                    elif role:
                        texts.append(role)
                content = message.get("content")
                if content is not None:
                    if type(content) is not str:
                        return None
                    if content:
                        texts.append(content)
                who = message.get("name")
                if who is not None:
                    if type(who) is not str:
                        return None
                    if who:
                        texts.append(who)
                    fixed += OPENAI_TOKENS_PER_NAME
        if encoder is not None:
            role_hits = role_count + (hits if start else 0)
            hits += role_count + len(texts)
        else:
            role_hits = hits = 0
        text += role_tokens + self._count_texts(name, encoder, texts, extra_hits=role_hits)
        if slot is not None and tail:
            entry = _Prefix(copies + list(map(dict.copy, tail)), blocks, text, fixed, hits)
            with self._lock:
                prefixes = self._prefixes
                prefixes.pop(slot, None)
                prefixes[slot] = entry
                while len(prefixes) > PREFIX_SLOTS:
                    del prefixes[next(iter(prefixes))]
        if anthropic:
            self._anthropic_extras(tally, body)
            fixed += CLAUDE_REQUEST_OVERHEAD
        else:
            self._chat_extras(tally, body)
            fixed += OPENAI_REPLY_PRIMING
        text += self._count_texts(name, encoder, tally.texts)
        if anthropic or _is_claude(model):
            text = (text * _CLAUDE_NUM + _CLAUDE_DEN - 1) // _CLAUDE_DEN
        return text + fixed + tally.fixed

    # ---------------------------------------------------------------------------------------------------------------
    # counting and cache

    def _count_texts(self, name: str, encoder: _Encoder | None, texts: list[str], *, extra_hits: int = 0) -> int:
        if not texts:
            if extra_hits:
                with self._lock:
                    self.cache_hits += extra_hits
            return 0
        if encoder is None:
            return sum(_approx_tokens(text) for text in texts)
        total = 0
        misses: list[str] = []
        cache = self._cache
        get = cache.get
        with self._lock:
            for text in texts:
                key = (name, text)
                hit = get(key)
                if hit is None:
                    misses.append(text)
                else:
                    if len(text) >= PROMOTE_CHARS:
                        cache.move_to_end(key)
                    total += hit
            self.cache_lookups += len(texts)
            self.cache_hits += len(texts) - len(misses) + extra_hits
            self.cache_misses += len(misses)
        if not misses:
            return total
        fresh: dict[str, int] = {}
        for text in misses:  # encode outside the lock: a long text must not stall other threads
            count = fresh.get(text)
            if count is None:
                count = fresh[text] = _encode_len(encoder, text)
            total += count
        with self._lock:
            self.encode_calls += len(fresh)
            self.encoded_chars += sum(map(len, fresh))
            for text, count in fresh.items():
                self._store((name, text), count)
        return total

    def _memo(self, kind: str, text: str, compute: Callable[[], int]) -> int:
        """Non-text derived counts (PDF pages) share the LRU and its budget."""
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        value = compute()
        with self._lock:
            self._store(key, value)
        return value

    def _store(self, key: tuple[str, str], value: int) -> None:
        cost = len(key[1]) + CACHE_ENTRY_OVERHEAD_CHARS
        if cost > self._budget:
            return
        cache = self._cache
        if key in cache:
            cache.move_to_end(key)
            return
        cache[key] = value
        self._used += cost
        while self._used > self._budget:
            old, _ = cache.popitem(last=False)
            self._used -= len(old[1]) + CACHE_ENTRY_OVERHEAD_CHARS

    # ---------------------------------------------------------------------------------------------------------------
    # OpenAI shapes

    def _openai(self, tally: _Tally, body: dict[str, Any], request: CallRequest) -> None:
        operation = request.operation
        if operation == "embeddings":
            self._prompt_like(tally, body, "input", request)
        elif operation == "text_completion":
            self._prompt_like(tally, body, "prompt", request)
            tally.text(body.get("suffix"))
        elif "messages" in body:
            self._chat(tally, body, request)
        elif any(not _absent(body.get(k)) for k in ("input", "instructions", "previous_response_id", "conversation")):
            self._responses(tally, body, request)
        elif isinstance(body.get("prompt"), (str, list, tuple)):
            self._prompt_like(tally, body, "prompt", request)
        else:
            self._chat(tally, body, request)

    def _prompt_like(self, tally: _Tally, body: dict[str, Any], field: str, request: CallRequest) -> None:
        value = _plain(body.get(field))
        items = _as_list(value)
        if items is None:
            raise ConfigError(
                f"expected a string, a list of strings or a list of token ids, got {type(value).__name__}; "
                "nothing to count",
                key=field,
                source=_where(request),
            )
        tally.found = True
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool):
                tally.fixed += 1  # a token id
                continue
            item = _plain(item)
            inner = _items(item)
            if inner is not None and all(isinstance(x, int) and not isinstance(x, bool) for x in inner):
                tally.fixed += len(inner)
            else:
                tally.text(item)

    def _chat(self, tally: _Tally, body: dict[str, Any], request: CallRequest) -> None:
        raw = _plain(body.get("messages"))
        messages = _as_list(raw)
        if messages is not None:
            tally.found = True
            for message in messages:
                self._chat_message(tally, message)
            tally.fixed += OPENAI_REPLY_PRIMING
        self._chat_extras(tally, body)
        if not tally.found:
            raise ConfigError(
                f"a chat request needs a list of messages, got {type(raw).__name__}; nothing to count",
                key="messages",
                source=_where(request),
            )

    def _chat_extras(self, tally: _Tally, body: dict[str, Any]) -> None:
        """Everything of a chat request but its messages."""
        self._openai_tools(tally, body.get("tools"))
        self._openai_tools(tally, body.get("functions"))
        response_format = _plain(body.get("response_format"))
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            tally.found = True
            tally.text(_json(response_format.get("json_schema", response_format)))

    def _chat_message(self, tally: _Tally, message: Any) -> None:
        message = _plain(message)
        tally.fixed += OPENAI_TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            tally.text(message)  # a bare string or number where a message belongs: count it as content
            return
        for key, value in message.items():
            if _absent(value):
                continue
            if key == "content":
                self._openai_content(tally, value)
            elif key == "tool_calls":
                for call in _as_list(_plain(value)) or ():
                    self._openai_tool_call(tally, call)
            elif key == "function_call":
                self._openai_tool_call(tally, {"function": value})
            elif key == "name":
                tally.text(value)
                tally.fixed += OPENAI_TOKENS_PER_NAME
            elif isinstance(value, str):
                tally.text(value)  # role, tool_call_id, refusal, ...: the cookbook counts every string field

    def _openai_tool_call(self, tally: _Tally, call: Any) -> None:
        call = _plain(call)
        if not isinstance(call, dict):
            tally.text(call)
            return
        inner = _plain(call.get("function") if "function" in call else call.get("custom"))
        if isinstance(inner, dict):
            tally.text(inner.get("name"))
            tally.text(inner.get("arguments", inner.get("input")))
        else:
            tally.text(inner)

    def _openai_tools(self, tally: _Tally, tools: Any) -> None:
        items = _items(_plain(tools))
        if not items:
            return
        tally.found = True
        for tool in items:
            tally.text(_json(_plain(tool)))
            tally.fixed += OPENAI_TOKENS_PER_TOOL
        tally.fixed += OPENAI_TOOLS_END

    def _openai_content(self, tally: _Tally, content: Any) -> None:
        _walk_content(tally, content, self._openai_part)

    def _openai_part(self, tally: _Tally, part: dict[str, Any]) -> None:
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            tally.text(part.get("text"))
        elif kind == "refusal":
            tally.text(part.get("refusal"))
        elif kind in ("image_url", "input_image", "computer_screenshot") or (kind is None and "image_url" in part):
            image = _plain(part.get("image_url"))
            detail = part.get("detail")
            if isinstance(image, dict):
                detail = image.get("detail", detail)
                image = image.get("url")
            tally.fixed += _image_tokens(tally.model, image, detail)
        elif kind == "input_audio":
            tally.fixed += _audio_tokens(part.get("input_audio"))
        elif kind in ("file", "input_file"):
            spec = _plain(part.get("file")) if kind == "file" else part
            if isinstance(spec, dict):
                tally.text(spec.get("filename"))
                tally.fixed += self._file_tokens(spec.get("file_data"), None)
            else:
                tally.fixed += UNKNOWN_FILE_TOKENS
        elif isinstance(part.get("text"), str):
            tally.text(part["text"])
        else:
            tally.text(_json(part))

    def _responses(self, tally: _Tally, body: dict[str, Any], request: CallRequest) -> None:
        instructions = _plain(body.get("instructions"))
        if isinstance(instructions, str):
            tally.found = True
            tally.fixed += OPENAI_TOKENS_PER_MESSAGE
            tally.text(instructions)
        elif _items(instructions) is not None:
            tally.found = True
            self._responses_input(tally, instructions)
        raw = _plain(body.get("input"))
        if isinstance(raw, str):
            tally.found = True
            tally.fixed += OPENAI_TOKENS_PER_MESSAGE
            tally.text("user")
            tally.text(raw)
        elif _as_list(raw) is not None:
            tally.found = True
            self._responses_input(tally, raw)
        if not _absent(body.get("previous_response_id")) or not _absent(body.get("conversation")):
            tally.found = True  # server-side history: legitimately nothing else to count here
        self._openai_tools(tally, body.get("tools"))
        text = _plain(body.get("text"))
        fmt = _plain(text.get("format")) if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            tally.text(_json(fmt))
        if not tally.found:
            raise ConfigError(
                f"a Responses request needs input (a string or a list of items), got {type(raw).__name__}; "
                "nothing to count",
                key="input",
                source=_where(request),
            )
        tally.fixed += OPENAI_REPLY_PRIMING

    def _responses_input(self, tally: _Tally, value: Any) -> None:
        for raw in _as_list(value) or ():
            item = _plain(raw)
            if not isinstance(item, dict):
                tally.fixed += OPENAI_TOKENS_PER_MESSAGE
                tally.text(item)
                continue
            kind = item.get("type")
            if kind in (None, "message") and ("role" in item or "content" in item):
                tally.fixed += OPENAI_TOKENS_PER_MESSAGE
                tally.text(item.get("role"))
                self._openai_content(tally, item.get("content"))
            elif kind in ("function_call", "custom_tool_call"):
                tally.text(item.get("name"))
                tally.text(item.get("arguments", item.get("input")))
            elif kind in ("function_call_output", "custom_tool_call_output", "computer_call_output"):
                self._openai_content(tally, item.get("output"))
            elif kind == "reasoning":
                for field in ("summary", "content"):
                    for piece in _items(_plain(item.get(field))) or []:
                        piece = _plain(piece)
                        tally.text(piece.get("text") if isinstance(piece, dict) else piece)
                tally.fixed += _opaque_tokens(item.get("encrypted_content"))
            elif kind == "item_reference":
                continue
            else:
                tally.text(_json(item))

    def _file_tokens(self, data: Any, media_type: Any) -> int:
        if not isinstance(data, str) or not data:
            return UNKNOWN_FILE_TOKENS
        start = 0
        parsed = _data_url(data)
        if parsed is not None:
            media_type, start = parsed
        head = _b64_prefix(data, start, 8) or b""
        if head.startswith(b"%PDF") or (isinstance(media_type, str) and "pdf" in media_type.lower()):
            return PDF_TOKENS_PER_PAGE * self._memo("pdf-pages", data, lambda: self._count_pdf_pages(data, start))
        return -(-2 * _b64_size(data, start) // 7)  # other inline files: as text at 3.5 bytes per token

    @staticmethod
    def _count_pdf_pages(data: str, start: int) -> int:
        raw = _b64_prefix(data, start, len(data))
        if raw is None:
            return max(1, -(-_b64_size(data, start) // PDF_BYTES_PER_PAGE_FALLBACK))
        return _pdf_pages(raw)

    # ---------------------------------------------------------------------------------------------------------------
    # Anthropic shapes

    def _anthropic(self, tally: _Tally, body: dict[str, Any], request: CallRequest) -> None:
        system = _plain(body.get("system"))
        if not _absent(system):
            tally.found = True
            self._anthropic_content(tally, system)
        raw = _plain(body.get("messages"))
        messages = _as_list(raw)
        if messages is not None:
            tally.found = True
            for message in messages:
                message = _plain(message)
                tally.fixed += CLAUDE_TOKENS_PER_MESSAGE
                if isinstance(message, dict):
                    self._anthropic_content(tally, message.get("content"))
                else:
                    tally.text(message)
        self._anthropic_extras(tally, body)
        if not tally.found:
            raise ConfigError(
                f"an Anthropic request needs a list of messages, got {type(raw).__name__}; nothing to count",
                key="messages",
                source=_where(request),
            )
        tally.fixed += CLAUDE_REQUEST_OVERHEAD

    def _anthropic_extras(self, tally: _Tally, body: dict[str, Any]) -> None:
        """Everything of an Anthropic request but its system prompt and messages."""
        tools = _items(_plain(body.get("tools")))
        if tools:
            tally.found = True
            for tool in tools:
                tally.text(_json(_plain(tool)))
            tally.fixed += CLAUDE_TOOLS_SYSTEM_PROMPT
        for key in ("output_format", "output_config"):
            extra = _plain(body.get(key))
            if isinstance(extra, dict):
                tally.text(_json(extra))

    def _anthropic_content(self, tally: _Tally, content: Any) -> None:
        _walk_content(tally, content, self._anthropic_block)

    def _anthropic_block(self, tally: _Tally, block: dict[str, Any]) -> None:
        kind = block.get("type")
        if kind == "text":
            tally.text(block.get("text"))
        elif kind == "image":
            source = _plain(block.get("source"))
            dims = None
            if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
                dims = _b64_image_dims(source["data"], 0)
            tally.fixed += _claude_image_tokens(dims)
        elif kind == "document":
            tally.text(block.get("title"))
            tally.text(block.get("context"))
            source = _plain(block.get("source"))
            source_type = source.get("type") if isinstance(source, dict) else None
            if source_type == "text" and isinstance(source, dict):
                tally.text(source.get("data"))
            elif source_type == "content" and isinstance(source, dict):
                self._anthropic_content(tally, source.get("content"))
            elif source_type == "base64" and isinstance(source, dict):
                tally.fixed += self._file_tokens(source.get("data"), source.get("media_type"))
            else:
                tally.fixed += UNKNOWN_FILE_TOKENS
        elif kind in ("tool_use", "server_tool_use", "mcp_tool_use"):
            tally.text(block.get("name"))
            tally.text(block.get("input"))
        elif kind in ("tool_result", "mcp_tool_result"):
            self._anthropic_content(tally, block.get("content"))
        elif kind == "thinking":
            tally.text(block.get("thinking"))
        elif kind == "redacted_thinking":
            tally.fixed += _opaque_tokens(block.get("data"))
        elif kind == "search_result":
            tally.text(block.get("title"))
            tally.text(block.get("source"))
            self._anthropic_content(tally, block.get("content"))
        elif isinstance(block.get("text"), str):
            tally.text(block["text"])
        else:
            tally.text(_json(block))


def _preload(models: list[str]) -> None:
    for model in models:
        try:
            _REGISTRY.preload(_model_encoding(_norm_model(model)))
        except Exception:  # a broken tiktoken install: the first estimate falls back and warns as usual
            return


def _where(request: CallRequest) -> str:
    return f"{request.provider} {request.operation} request for {request.model!r}"


def _walk_content(tally: _Tally, content: Any, part: Callable[[_Tally, dict[str, Any]], None]) -> None:
    """Content is a string, one part, or a list of parts (either vendor); ``part`` counts one dict part."""
    content = _plain(content)
    if isinstance(content, str):
        tally.text(content)
        return
    if isinstance(content, dict):
        part(tally, content)
        return
    items = _items(content)
    if items is None:
        tally.text(content)
        return
    for item in items:
        item = _plain(item)
        if isinstance(item, dict):
            part(tally, item)
        else:
            tally.text(item)
