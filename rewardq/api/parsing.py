"""Turn a request body (JSON or ndjson) into validated items, or raise an ApiError that names field and index."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from rewardq import conversations
from rewardq.api.errors import ApiError, FieldError, invalid
from rewardq.storage.repository import NewItem

MAX_REPORTED = 20
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/jsonlines", "application/x-jsonlines")
_MAX_ID = 256


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN and Infinity instead of letting them into the database, and turns
    nesting too deep for the parser into a ValueError instead of a crash. Bytes must be UTF-8 (a
    byte order mark is allowed); one decoder serves every call (an ndjson upload calls this per line)."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
        if text.startswith("\ufeff"):
            text = text[1:]
    try:
        return _DECODER.decode(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


@dataclass
class JobRequest:
    items: list[NewItem]
    model_version: str | dict[str, Any] | None  # a dict: {version: weight}, their ensemble
    metadata: dict[str, Any]


def _text(value: Any, name: str, idx: int, max_chars: int, errors: list[FieldError]) -> str:
    if value is None:
        errors.append(FieldError(name, "field required", idx))
    elif not isinstance(value, str):
        errors.append(FieldError(name, f"must be a string, got {type(value).__name__}", idx))
    elif "\x00" in value:
        errors.append(FieldError(name, "contains a NUL character", idx))
    elif len(value) > max_chars:
        errors.append(FieldError(name, f"longer than {max_chars} characters", idx))
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            errors.append(FieldError(name, "is not valid Unicode (lone surrogate)", idx))
            return ""
        return value
    return ""


def _check_list(raw: Any, name: str, max_items: int) -> list[Any]:
    if not isinstance(raw, list):
        raise invalid([FieldError(name, "must be a list of objects")])
    if not raw:
        raise invalid([FieldError(name, "must contain at least one entry")])
    if len(raw) > max_items:
        raise invalid([FieldError(name, f"at most {max_items} entries per request, got {len(raw)}")], status=413)
    return raw


def _messages(value: Any, name: str, idx: int, max_chars: int, errors: list[FieldError]) -> list[dict[str, str]]:
    """A conversation: a non-empty list of ``{"role", "content"}`` messages (content text, or text parts)."""
    if not isinstance(value, list) or not value:
        errors.append(FieldError(name, "a conversation is a non-empty list of {role, content} messages", idx))
        return []
    out = []
    for message in value:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in conversations.ROLES:
            errors.append(FieldError(name, f"each message needs a role, one of {', '.join(conversations.ROLES)}", idx))
            return []
        body = message.get("content")
        if not isinstance(body, str | list):
            errors.append(FieldError(name, f"a {role} message's content must be text", idx))
            return []
        out.append({"role": role, "content": _text(conversations.content(message), name, idx, max_chars, errors)})
    return out


def _prompt_and_response(obj: dict[str, Any], i: int, max_chars: int, errors: list[FieldError]) -> tuple[str, str]:
    """An item's prompt and response: texts, or conversations (rewardq.conversations): ``messages`` ending with the
    assistant's answer, or a ``prompt`` that is a list of messages (TRL's conversational prompts) with a response
    that is text or the assistant's messages."""
    n_errors, plain = len(errors), ""
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            errors.append(FieldError("messages", "give messages, or prompt and response, not both", i))
            return "", ""
        turns = _messages(obj["messages"], "messages", i, max_chars, errors)
        if len(errors) > n_errors:
            return "", ""
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            errors.append(FieldError("messages", "must end with the assistant's answer, after at least one turn", i))
            return "", ""
        prompt_turns, response = turns[:-1], turns[-1]["content"]
    else:
        raw_prompt, raw_response = obj.get("prompt"), obj.get("response")
        if isinstance(raw_prompt, list):
            prompt_turns = _messages(raw_prompt, "prompt", i, max_chars, errors)
        else:
            prompt_turns = []
            plain = _text(raw_prompt, "prompt", i, max_chars, errors)
            if plain.startswith(conversations.CONVERSATION):
                message = "begins with U+0001, which rewardq keeps for conversations: send them as messages"
                errors.append(FieldError("prompt", message, i))
        if isinstance(raw_response, list):
            answer = [m for m in _messages(raw_response, "response", i, max_chars, errors) if m["role"] == "assistant"]
            response = "".join(m["content"] for m in answer)
        else:
            response = _text(raw_response, "response", i, max_chars, errors)
        if not prompt_turns:
            return ("" if len(errors) > n_errors else plain), response
    prompt = conversations.encode(prompt_turns)
    if len(prompt) > max_chars:
        errors.append(FieldError("prompt", f"the conversation is longer than {max_chars} characters as JSON", i))
    return prompt, response


def validate_item(obj: Any, i: int, max_chars: int, errors: list[FieldError]) -> NewItem | None:
    """One scoring item (at index ``i``), or None with the reasons appended to ``errors``."""
    if not isinstance(obj, dict):
        errors.append(FieldError("item", f"must be an object, got {type(obj).__name__}", i))
        return None
    n_errors = len(errors)
    prompt, response = _prompt_and_response(obj, i, max_chars, errors)
    raw_id = obj.get("id")
    if raw_id is None:
        item_id = str(i)
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        errors.append(FieldError("id", f"must be a string or an integer, got {type(raw_id).__name__}", i))
    else:
        item_id = str(raw_id)
        if not item_id or len(item_id) > _MAX_ID or "\x00" in item_id:
            errors.append(FieldError("id", f"must be 1 to {_MAX_ID} characters without NUL", i))
    return NewItem(item_id, prompt, response) if len(errors) == n_errors else None


def validate_items(raw: Any, *, max_items: int, max_chars: int) -> list[NewItem]:
    _check_list(raw, "items", max_items)
    errors: list[FieldError] = []
    items: list[NewItem] = []
    seen: dict[str, int] = {}
    for i, obj in enumerate(raw):
        if len(errors) >= MAX_REPORTED:
            break
        item = validate_item(obj, i, max_chars, errors)
        if item is None:
            continue
        item_id = item.item_id
        if item_id in seen:
            errors.append(FieldError("id", f"duplicate id {item_id!r} (first at index {seen[item_id]})", i))
            continue
        seen[item_id] = i
        items.append(item)
    if errors:
        raise invalid(errors)
    return items


def parse_json_job(body: bytes, *, max_items: int, max_chars: int) -> JobRequest:
    try:
        doc = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid([FieldError("body", f"not valid JSON: {exc}")]) from exc
    if not isinstance(doc, dict):
        raise invalid([FieldError("body", 'must be an object like {"items": [...]}')])
    if "items" not in doc:
        raise invalid([FieldError("items", "field required")])
    model_version = doc.get("model_version")
    if model_version is not None and not isinstance(model_version, str | dict):
        raise invalid([FieldError("model_version", "must be a version's id or name, or {version: weight, ...}")])
    metadata = check_metadata(doc.get("metadata") or {})
    items = validate_items(doc["items"], max_items=max_items, max_chars=max_chars)
    return JobRequest(items, model_version, metadata)


def parse_ndjson(body: bytes, *, max_items: int) -> list[Any]:
    """One JSON value per line; blank lines are skipped but still counted in the reported line number."""
    objs: list[Any] = []
    for lineno, line in enumerate(body.split(b"\n")):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid([FieldError("line", f"line {lineno + 1} is not valid JSON: {exc}", len(objs))]) from exc
        objs.append(obj)
        if len(objs) > max_items:
            raise invalid([FieldError("items", f"at most {max_items} items per request")], status=413)
    return objs


def _rating(value: Any, idx: int, errors: list[FieldError]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(FieldError("rating", f"must be a number, got {type(value).__name__}", idx))
        return None
    if not math.isfinite(value):
        errors.append(FieldError("rating", "must be finite", idx))
        return None
    return float(value)


def _conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def _extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) as TRL's extract_prompt splits them, to the same index (trl/data_utils.py), but
    for answers that differ from their first character on (TRL then looks at the last character)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 (the index after the loop is TRL's answer)
        if chosen[idx] != rejected[idx]:
            if idx and chosen[idx - 1] == " ":  # the space before the answers stays with them
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def trl_feedback(obj: dict[str, Any], idx: int, errors: list[FieldError], max_chars: int = 1 << 20) -> dict[str, Any]:
    """TRL's dataset shapes as rewardq's feedback, read as a scoring item is read, so feedback and scores see the
    same input:

    - conversations (lists of ``{"role", "content"}`` messages) for ``prompt``, ``chosen``, ``rejected`` and
      ``completion``: the prompt kept as its messages (rewardq.conversations; a single user turn as its content),
      a completion's assistant turns;
    - an implicit prompt, ``{"chosen", "rejected"}`` alone: their common beginning is the prompt, as TRL's
      ``extract_prompt`` takes it (message by message for conversations, character by character for text);
    - prompt-completion, ``{"prompt", "completion", "rating"}``, and KTO's unpaired ``{"prompt", "completion",
      "label"}`` (label true: rating 1, false: rating 0)."""
    from rewardq.api.integrations.trl import as_completion

    out = dict(obj)
    if isinstance(out.get("prompt"), str) and out["prompt"].startswith(conversations.CONVERSATION):
        errors.append(FieldError("prompt", "begins with U+0001, which rewardq keeps for conversations", idx))
        out["prompt"] = ""
    if "completion" in out and "response" not in out and "chosen" not in out:
        out["response"] = out.pop("completion")
        if "rating" not in out and isinstance(out.get("label"), bool):
            out["rating"] = 1.0 if out.pop("label") else 0.0
    chosen, rejected = out.get("chosen"), out.get("rejected")
    same_shape = (isinstance(chosen, str) and isinstance(rejected, str)) or (
        _conversation(chosen) and _conversation(rejected)
    )
    # TRL's maybe_extract_prompt: no prompt, or a prompt of the other shape than the answers (a dataset that also
    # keeps the question as text beside conversations that hold it): the answers' common beginning is the prompt.
    if same_shape and ("prompt" not in out or _conversation(out["prompt"]) != _conversation(chosen)):
        out["prompt"], out["chosen"], out["rejected"] = _extract_prompt(chosen, rejected)
    for name in ("prompt", "response", "chosen", "rejected"):
        value = out.get(name)
        if isinstance(value, list):
            if not _conversation(value):
                errors.append(FieldError(name, "a list must be a conversation: {role, content} messages", idx))
                out[name] = ""
            elif name == "prompt":
                out[name] = conversations.encode(_messages(value, name, idx, max_chars, errors))
            else:
                out[name] = as_completion(value)
    return out


def validate_feedback(raw: Any, *, max_items: int, max_chars: int, offset: int = 0) -> list[dict[str, Any]]:
    """Preferences {prompt, chosen, rejected} and ratings {prompt, response, rating} as repository rows (errors
    name indexes from ``offset``: a chunk of a streamed upload), and TRL's dataset shapes (trl_feedback)."""
    _check_list(raw, "feedback", max_items)
    errors: list[FieldError] = []
    rows: list[dict[str, Any]] = []
    for i, obj in enumerate(raw, start=offset):
        if len(errors) >= MAX_REPORTED:
            break
        if not isinstance(obj, dict):
            errors.append(FieldError("feedback", f"must be an object, got {type(obj).__name__}", i))
            continue
        obj = trl_feedback(obj, i, errors, max_chars)
        prompt = _text(obj.get("prompt"), "prompt", i, max_chars, errors)
        if "chosen" in obj or "rejected" in obj:
            chosen = _text(obj.get("chosen"), "chosen", i, max_chars, errors)
            rejected = _text(obj.get("rejected"), "rejected", i, max_chars, errors)
            rows.append({"kind": "preference", "prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif "rating" in obj or "response" in obj:
            response = _text(obj.get("response"), "response", i, max_chars, errors)
            rating = _rating(obj.get("rating"), i, errors) if "rating" in obj else None
            if "rating" not in obj:
                errors.append(FieldError("rating", "field required", i))
            rows.append({"kind": "rating", "prompt": prompt, "response": response, "rating": rating})
        else:
            errors.append(FieldError("feedback", "needs chosen and rejected (a preference) or response and "
                                                 "rating (a rating)", i))  # fmt: skip
    if errors:
        raise invalid(errors)
    return rows


__all__ = [
    "ApiError",
    "JobRequest",
    "parse_json_job",
    "parse_ndjson",
    "validate_feedback",
    "validate_items",
    "loads",
]


METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 4


def check_metadata(metadata: Any) -> dict[str, Any]:
    """A job's metadata: an object of at most 16 KB (as JSON) nested at most 4 deep; it comes back with every job
    listed, so it must stay small. 422 naming ``metadata`` otherwise."""
    if not isinstance(metadata, dict):
        raise invalid([FieldError("metadata", "must be an object")])

    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES:
        raise invalid([FieldError("metadata", f"{size} bytes as JSON; at most {METADATA_MAX_BYTES}")])
    if depth(metadata) > METADATA_MAX_DEPTH:
        raise invalid([FieldError("metadata", f"nested more than {METADATA_MAX_DEPTH} levels deep")])
    return metadata
