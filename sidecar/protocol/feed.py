"""What a store's feed says (`Store.run_feed` speaks it, the hub and the streams hear it): a
message newly logged, with its place in its user's log, or `HistoryLost`. No I/O.

It sits in `protocol/`, the layer both the stores and the hub import from, so that neither
has to import the other to agree on it.
"""

from __future__ import annotations

import dataclasses

from sidecar.protocol.message import Message


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryLost:
    """Put in the feed when the store could not tell what was written while it was not
    looking (for example a change stream's resume point fell off the oplog): every open
    stream should ask the store again for what it has not been sent."""


FeedItem = Message | HistoryLost
