"""Raw records as read from any source, before validation."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    loc: str      # where it came from, for error messages: "data.jsonl:7"
    key: str      # stable id for the seeded split (file path, or line number within the file)
    fields: dict  # the record's fields as read


@dataclass
class Source:
    records: list[Record]
    identity: dict  # cache key part: changes when the underlying data changes
