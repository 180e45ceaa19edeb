"""The definition as the SDK migration compares it: archive keys masked, so that a change in code/ or lambda/
does not change the stored definition the v3 build is compared with (tests/fixtures/definition-v2.json)."""
from __future__ import annotations

import re

ARCHIVE_KEY = re.compile(r"(/assets/(?:code|lambda)/)[0-9a-f]{16}/")
MASKED_KEY = r"\1<sha256-prefix>/"


def masked(definition: str) -> str:
    """``definition`` (the JSON text) with each content-addressed archive's hash prefix replaced by a fixed mark."""
    return ARCHIVE_KEY.sub(MASKED_KEY, definition)
