"""What a Tock web connector can decode: the send API's check of a `response`.

A Tock instance that holds SSE streams itself (a migration in progress, or Tock 23.9's
listener) decodes every document inserted into `web_channel_event`, and a document it
cannot decode ends its change stream (it reopens it 5 s later, and fails again on the
next such document). So with `SIDECAR_RESPONSE_SCHEMA=tock` the send API refuses, with a
400 naming the rule, a `response` that any supported Tock version (23.9 and 24.3 onwards)
would fail on: Tock's `WebConnectorResponse`, as its fixtures show it
(`tests/data/tock_documents.jsonl`):

- `responses`, a list of objects (Tock: a missing field is a decode error);
- each response with `"type": "WebMessage"` (the Jackson type id Tock 23.9 to 25.10 need);
- each button (of a response, a card, a carousel's cards) with a `clazz` Tock knows;
- `metadata`, when present, an object of strings (Tock's `Map<String, String>`).

Anything else in a response is left to the browser, as Tock leaves it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

BUTTON_CLASSES = ("postback_button", "url_button", "quick_reply")


class NotDecodable(ValueError):
    """The response breaks one of Tock's decode rules; the message names where and which."""


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NotDecodable(f"{where} must be a list")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise NotDecodable(f"{where} must be an object")
    return value


def _buttons_of(holder: Mapping[str, Any], where: str) -> Iterator[tuple[str, Any]]:
    """The buttons of a response or a card, each with where it is."""
    for i, button in enumerate(_list(holder.get("buttons"), f"{where}.buttons")):
        yield f"{where}.buttons[{i}]", button


def _buttons(message: Mapping[str, Any], where: str) -> Iterator[tuple[str, Any]]:
    yield from _buttons_of(message, where)
    if message.get("card") is not None:
        yield from _buttons_of(_object(message["card"], f"{where}.card"), f"{where}.card")
    if message.get("carousel") is not None:
        carousel = _object(message["carousel"], f"{where}.carousel")
        for c, card in enumerate(_list(carousel.get("cards"), f"{where}.carousel.cards")):
            at = f"{where}.carousel.cards[{c}]"
            yield from _buttons_of(_object(card, at), at)


def check(response: Mapping[str, Any]) -> None:
    """Raise NotDecodable when a Tock web connector could not decode `response`."""
    responses = response.get("responses")
    if not isinstance(responses, list):
        raise NotDecodable("response.responses must be a list of messages")
    for r, message in enumerate(responses):
        where = f"response.responses[{r}]"
        if not isinstance(message, Mapping):
            raise NotDecodable(f"{where} must be an object")
        if message.get("type") != "WebMessage":
            raise NotDecodable(f'{where} needs "type": "WebMessage"')
        for at, button in _buttons(message, where):
            if not isinstance(button, Mapping) or button.get("clazz") not in BUTTON_CLASSES:
                raise NotDecodable(f"{at} needs a clazz: {', '.join(BUTTON_CLASSES)}")
    for key, value in _object(response.get("metadata", {}), "response.metadata").items():
        if not isinstance(value, str):
            raise NotDecodable(f"response.metadata.{key} must be a string")
