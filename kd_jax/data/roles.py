"""What each token of a trace is: the per-token `role` array of the KD store and of every batch."""

from __future__ import annotations

import enum


class Role(enum.IntEnum):
    """A token's part of its trace. Stored as uint8 in the store, int32 in batches."""
    PROMPT = 0  # the rendered prompt and generation prompt: never supervised
    REASONING = 1  # the think block, tags included: one reasoning step per paragraph
    ANSWER = 2  # after `</think>`, EOS included
