"""The keys a reader passes, checked and turned into the text that finds an entity.

`FeatureClient.get` takes one key, `get_many` a list (never a bare string), and a feature
service the values of its entity columns. A key is a str; an int is read as its decimal text
(for an integer key field) and a bool as "true"/"false"; a view keyed by several columns takes
a tuple with one such value per column. Anything else raises `KeyTypeError` naming the view and
its key columns. The text is `state.codec.key_text`'s, the write path's, so it picks the same
shard and the same RocksDB key:

    key (str | int | tuple) --key_text_of / key_texts--> key text
        --murmur2--> partition   --ENTITY_PREFIX + UTF-8--> RocksDB key of the entity's blob
"""

from __future__ import annotations

from collections.abc import Sequence

from state.codec import key_text
from state.errors import KeyTypeError
from state.layout import ViewLayout


def key_texts(view: str, layout: ViewLayout, keys: Sequence[str | int]) -> list[str]:
    """The key text of each of `keys` (a list, not one string)."""
    if isinstance(keys, str | bytes):
        raise KeyTypeError(
            f"view {view!r}: get_many takes a list of keys, got the single key {keys!r}; "
            f"use get({view!r}, key) or get_many({view!r}, [key])"
        )
    if len(layout.key_columns) == 1:  # a str key is its own text
        return [k if type(k) is str else key_text_of(view, layout, k) for k in keys]
    return [key_text_of(view, layout, key) for key in keys]


def key_text_of(view: str, layout: ViewLayout, key: object) -> str:
    """The key text of one key of `view`."""
    parts = layout.key_columns
    if len(parts) > 1:
        if not isinstance(key, tuple | list) or len(key) != len(parts):
            raise KeyTypeError(
                f"view {view!r}: key {key!r} is not a composite key; the view is keyed by "
                f"{parts}: pass a tuple of {len(parts)} values, e.g. "
                f"{tuple(f'<{p}>' for p in parts)}"
            )
        return key_text([_part(view, parts, p) for p in key])
    if isinstance(key, tuple) and len(key) == 1:
        key = key[0]
    return key_text([_part(view, parts, key)])


def _part(view: str, parts: tuple[str, ...], value: object) -> str | int | bool:
    if isinstance(value, str | int):  # an int is its decimal text, a bool "true"/"false"
        return value
    what = "a tuple (a composite key)" if isinstance(value, tuple | list) else type(value).__name__
    raise KeyTypeError(
        f"view {view!r}: key {value!r} is {what}; the view is keyed by "
        f"{parts[0] if len(parts) == 1 else parts!r}, whose values are str (or int for an "
        "integer column): pass the key as a str"
    )
