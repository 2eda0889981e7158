"""The parquet row-index cache of data/parquet.py: a cache written in the version-1 format (column lists inline, no
"schemas" table) is rebuilt instead of crashing, and the rebuilt cache is read back on the next call."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from data.parquet import INDEX_NAME, INDEX_VERSION, describe_parquet, list_parquet, load_index


def write_parquet(root, name: str, rows: int) -> None:
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)], "x": list(range(rows))}), root / name,
                   row_group_size=1)


def test_version_1_cache_is_rebuilt(tmp_path):
    write_parquet(tmp_path, "a.parquet", 3)
    write_parquet(tmp_path, "b.parquet", 2)
    listing = list_parquet(tmp_path)
    described = [{**f, **describe_parquet(tmp_path / f["path"])} for f in listing]
    # The format before the schema table: every file carries its own column list; the listing key matches.
    (tmp_path / INDEX_NAME).write_text(json.dumps({"version": 1, "files": described}))
    assert INDEX_VERSION != 1
    files = load_index(tmp_path)
    assert [(f["path"], f["rows"], f["columns"]) for f in files] == [("a.parquet", 3, ["id", "x"]),
                                                                     ("b.parquet", 2, ["id", "x"])]
    cached = json.loads((tmp_path / INDEX_NAME).read_text())
    assert cached["version"] == INDEX_VERSION and cached["schemas"] == [["id", "x"]]
    assert load_index(tmp_path, rank=1, timeout_s=0.0) == files  # a non-zero rank reads the rebuilt cache as is
