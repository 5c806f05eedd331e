#!/usr/bin/env python3
"""Makes tests/fixtures/shards/: token shards written by pyarrow, one per accepted id type, plus bad ones.

Good files hold the same three documents (expected.json) as input_ids of type
list<int32>, list<int64>, list<uint16>, list<uint32> and large_list<int64>, in two row groups.
Bad files: a string column, a missing column, and a token id outside a vocabulary of 100.

Usage: python scripts/make_parquet_fixtures.py   (needs pyarrow)
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "shards"
DOCS = [[1, 5, 9, 2], [7, 7, 8, 99, 3, 4], [42]]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, typ in [
        ("int32", pa.list_(pa.int32())),
        ("int64", pa.list_(pa.int64())),
        ("uint16", pa.list_(pa.uint16())),
        ("uint32", pa.list_(pa.uint32())),
        ("large_int64", pa.large_list(pa.int64())),
    ]:
        table = pa.table({"input_ids": pa.array(DOCS, type=typ), "source": ["a", "b", "c"]})
        pq.write_table(table, OUT / f"{name}.parquet", row_group_size=2)
    pq.write_table(pa.table({"input_ids": ["1 2 3", "4 5"]}), OUT / "bad_strings.parquet")
    pq.write_table(pa.table({"tokens": pa.array(DOCS, type=pa.list_(pa.int32()))}), OUT / "bad_missing_column.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2], [3, 100, 4]], type=pa.list_(pa.int32()))}), OUT / "bad_out_of_vocab.parquet")
    (OUT / "expected.json").write_text(json.dumps({"docs": DOCS, "vocab_size": 100}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()


def chat_fixture():
    """tests/fixtures/chat.parquet: chats as `messages: list<struct<role, content>>`, and
    tests/fixtures/chat_prompt_response.parquet: the `prompt`/`response` form."""
    root = OUT.parent
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        [{"role": "user", "content": "My name is Ann. What is my name?"}, {"role": "assistant", "content": "Your name is Ann."}],
    ]
    pq.write_table(pa.table({"messages": messages}), root / "chat.parquet")
    pq.write_table(pa.table({"prompt": ["Hi", "Bye"], "response": ["Hello.", "Goodbye."]}), root / "chat_prompt_response.parquet")


chat_fixture()
