"""A sample's metadata (captions, labels, the source's other columns) made to fit the latent dataset's columns.

Scraped data is heterogeneous: one WebDataset sample's `.json` caption is a number, another's a dict; a
`metadata.jsonl` labels one image 3 and another "cat". Such values are data, not errors, and never cost the
shard they are in. The rule, one for every source:

- a text column (captions, a tar sample's json member, any string column) keeps text as it is and stores any
  other value as its JSON text (`5` -> "5", `{"en": "a cat"}` -> '{"en": "a cat"}');
- an image folder's `metadata.jsonl` column that parquet cannot store as it is (values of no one type, 3 and
  "cat"; an empty object) becomes a text column of each value's JSON text ("3", '"cat"', "{}"), so nothing is
  lost and every row has the same type;
- a value that fits its column in no such way (a parquet file whose schema differs from the first file's) makes
  that sample one failed input ("bad_metadata", naming the column), and the shard's other samples are kept.
"""

from __future__ import annotations

import json
from typing import Any

from ..utils.errors import short_repr

BAD_METADATA = "bad_metadata"  # the failure reason of a sample whose metadata fits no column type


class MetadataError(ValueError):
    """A sample's metadata value that does not fit its column; the message names the column."""


def as_text(value: Any) -> str | None:
    """A caption or other text field: text as it is, None as None, anything else as its JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


class MetadataFitter:
    """Fits each sample's passthrough values to the output's column types (the source's 🤗 Features)."""

    def __init__(self, passthrough) -> None:
        self.schema = passthrough.arrow_schema if len(passthrough) else None

    def __call__(self, metadata: dict) -> dict:
        """`metadata` with text columns normalised (`as_text`); MetadataError when a value fits its column no way."""
        import pyarrow as pa

        if self.schema is None:
            return metadata
        fitted = dict(metadata)
        for column in self.schema:
            if column.name not in fitted:
                continue
            value = fitted[column.name]
            if _is_text(column.type):
                fitted[column.name] = as_text(value)
                continue
            try:
                pa.array([value], type=column.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                raise MetadataError(f"column {column.name!r}: {short_repr(value)} is not a {column.type} "
                                    "(the source's other rows' type)") from None
        return fitted


def _storable(column: list) -> bool:
    """Whether parquet can store this column as it is: one arrow type for all its values, and a type parquet
    writes (not, for instance, a struct with no fields, which `{}` is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        values = pa.array(column)
        pq.write_table(pa.table({"column": values.slice(0, 0)}), pa.BufferOutputStream())
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return True


def uniform_columns(rows: dict[str, list]) -> dict[str, list]:
    """Columns of rows built from metadata files (an image folder's metadata.jsonl): a column that parquet cannot
    store as it is (values of no one type, an empty object) becomes the JSON text of each value (None stays None)."""
    for name, column in rows.items():
        if not _storable(column):
            rows[name] = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
                          for v in column]
    return rows
