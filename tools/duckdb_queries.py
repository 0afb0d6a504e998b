"""Runs queries/*.sql with DuckDB's Python package, as the DuckDB CLI would, and prints each
result as JSON: {"<query>": [{column: value, ...}, ...]}. The end-to-end tests compare these
numbers with `coordinator aggregate`'s.

    python3 tools/duckdb_queries.py [--facts all] [--metric M] [--scale S] [--recovery R]
        [--floor F] <sweep folder> [query ...]   (default: all queries)

The options set queries/facts.sql's variables of the same names (as `coordinator aggregate`'s
--facts, --metric, --scale, --recovery and --recovery-floor); one left out keeps its default.
The Python API has no dot-commands, so `.read queries/facts.sql` lines are executed here.
"""

import argparse
import json
import math
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


def finite(value):
    """NaN and infinities as null: JSON has no other spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", default="correct", choices=["correct", "all"])
    parser.add_argument("--metric", choices=["prob", "logprob", "logit_diff", "kl"])
    parser.add_argument("--scale", choices=["raw", "recovery"])
    parser.add_argument("--recovery", choices=["ratio-of-means", "per-fact"])
    parser.add_argument("--floor", type=float)
    parser.add_argument("results")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    names = args.names or ["rollup", "ate", "per_relation", "top_facts", "figure3", "heads"]
    root = pathlib.Path(__file__).resolve().parent.parent
    out = {}
    for name in names:
        con = duckdb.connect()
        con.execute("SET VARIABLE results = ?", [args.results])
        con.execute("SET VARIABLE facts = ?", [args.facts])
        for variable in ["metric", "scale", "recovery", "floor"]:
            value = getattr(args, variable)
            if value is not None:
                # A variable is a name, not a parameter: the name is one of these four.
                con.execute(f"SET VARIABLE {variable} = ?", [value])
        os.chdir(root)
        cur = run(con, pathlib.Path("queries") / f"{name}.sql")
        columns = [d[0] for d in cur.description]
        out[name] = [dict(zip(columns, map(finite, row))) for row in cur.fetchall()]
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
