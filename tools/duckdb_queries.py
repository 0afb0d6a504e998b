"""Runs queries/*.sql with DuckDB's Python package, as the DuckDB CLI would, and prints each
result as JSON: {"<query>": [{column: value, ...}, ...]}. The end-to-end tests compare these
numbers with `coordinator aggregate`'s.

    python3 tools/duckdb_queries.py [--facts all] <sweep folder> [query ...]   (default: all queries)

The Python API has no dot-commands, so `.read queries/facts.sql` lines are executed here.
"""

import json
import os
import pathlib
import sys

import duckdb


def run(con, path: pathlib.Path):
    statements = []
    for line in path.read_text().splitlines():
        if line.startswith(".read "):
            run(con, pathlib.Path(line.split(None, 1)[1].strip()))
        elif not line.lstrip().startswith("--"):
            statements.append(line)
    # Comments are gone, and no query has a ";" inside a string: split into statements.
    parts = [p for p in "\n".join(statements).split(";") if p.strip()]
    result = None
    for part in parts:
        result = con.execute(part)
    return result


def main():
    args = sys.argv[1:]
    facts = "correct"
    if args[:1] == ["--facts"]:
        facts, args = args[1], args[2:]
    results = args[0]
    names = args[1:] or ["rollup", "ate", "per_relation", "top_facts", "figure3", "heads"]
    root = pathlib.Path(__file__).resolve().parent.parent
    out = {}
    for name in names:
        con = duckdb.connect()
        con.execute("SET VARIABLE results = ?", [results])
        con.execute("SET VARIABLE facts = ?", [facts])
        os.chdir(root)
        cur = run(con, pathlib.Path("queries") / f"{name}.sql")
        columns = [d[0] for d in cur.description]
        out[name] = [dict(zip(columns, row)) for row in cur.fetchall()]
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
