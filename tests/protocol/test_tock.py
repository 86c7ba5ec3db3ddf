"""`protocol/tock.py`: what a Tock web connector decodes, as the fixture README states it."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.protocol import tock
from tests.tock_documents import fixtures

MESSAGE = {"type": "WebMessage", "text": "hi"}
BUTTON = {"clazz": "postback_button", "title": "t", "payload": "p", "type": "postback"}


def test_every_response_tock_wrote_passes() -> None:
    for fixture in fixtures():
        tock.check(fixture.response)


@pytest.mark.parametrize(
    "response",
    [
        {"responses": []},
        {"responses": [MESSAGE], "metadata": {"RESPONSE_ID": "x"}},
        {"responses": [{**MESSAGE, "buttons": [BUTTON], "card": {"buttons": [BUTTON]}}]},
        {"responses": [{**MESSAGE, "carousel": {"cards": [{"buttons": [BUTTON]}, {}]}}]},
        {"responses": [{**MESSAGE, "buttons": None, "card": None, "carousel": None}]},
        {"responses": [{**MESSAGE, "anything": {"else": [1, 2]}}]},
    ],
)
def test_what_tock_decodes(response: dict[str, Any]) -> None:
    tock.check(response)


@pytest.mark.parametrize(
    ("response", "rule"),
    [
        ({}, "response.responses must be a list"),
        ({"responses": {"a": 1}}, "response.responses must be a list"),
        ({"responses": ["text"]}, "response.responses[0] must be an object"),
        ({"responses": [{"text": "no type"}]}, 'response.responses[0] needs "type"'),
        ({"responses": [MESSAGE, {"type": "Other"}]}, 'response.responses[1] needs "type"'),
        ({"responses": [{**MESSAGE, "buttons": BUTTON}]}, "responses[0].buttons must be a list"),
        ({"responses": [{**MESSAGE, "buttons": [{"title": "t"}]}]}, "buttons[0] needs a clazz"),
        ({"responses": [{**MESSAGE, "buttons": ["b"]}]}, "buttons[0] needs a clazz"),
        ({"responses": [{**MESSAGE, "buttons": [{"clazz": "x"}]}]}, "buttons[0] needs a clazz"),
        ({"responses": [{**MESSAGE, "card": []}]}, "responses[0].card must be an object"),
        (
            {"responses": [{**MESSAGE, "card": {"buttons": [BUTTON, {}]}}]},
            "responses[0].card.buttons[1] needs a clazz",
        ),
        ({"responses": [{**MESSAGE, "carousel": "c"}]}, "carousel must be an object"),
        ({"responses": [{**MESSAGE, "carousel": {"cards": ["c"]}}]}, "cards[0] must be an object"),
        (
            {"responses": [{**MESSAGE, "carousel": {"cards": [{"buttons": [{}]}]}}]},
            "carousel.cards[0].buttons[0] needs a clazz",
        ),
        ({"responses": [MESSAGE], "metadata": []}, "response.metadata must be an object"),
        ({"responses": [MESSAGE], "metadata": {"n": 1}}, "response.metadata.n must be a string"),
        ({"responses": [MESSAGE], "metadata": {"o": {}}}, "response.metadata.o must be a string"),
    ],
)
def test_what_tock_cannot_decode(response: dict[str, Any], rule: str) -> None:
    with pytest.raises(tock.NotDecodable) as refused:
        tock.check(response)
    assert rule in str(refused.value)
