"""``capnet reproduce --list`` and ``capnet reproduce TABLE --data-root DIR --out DIR``: one command per paper table.

Each table is a YAML file under configs/tables/ (its rows: a paper config + an experiment config +
overrides); the rows run one after another through the library (``capnet.reproduce``), finished
rows are read back instead of rerun, a failed row is reported in the table and the others still
run. OUT gets one run directory per row plus table.md and table.json, the published figures beside.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from capnet.errors import CapnetError, Interrupted


def _weights(items: List[str]) -> Dict[str, str]:
    """``--weights [BACKBONE=]PATH`` items -> {backbone tag or '*': absolute path}."""
    out: Dict[str, str] = {}
    for item in items:
        tag, path = item.split("=", 1) if "=" in item and not Path(item).exists() else ("*", item)
        out[tag] = str(Path(path).expanduser().resolve())
    return out


def list_all(folder) -> int:
    """Print every table, its rows and the command that runs it."""
    from capnet.reproduce import list_tables

    for table in list_tables(folder):
        datasets = sorted({r.data_dir for r in table.rows if r.data_dir})
        print(f"{table.name}: {table.title} ({len(table.rows)} rows; --data-root holds {', '.join(d + '/' for d in datasets)})")
        for row in table.rows:
            print(f"  {row.name:<32} {row.label}")
        print(f"  run: capnet reproduce {table.name} --data-root DIR --out runs/{table.name}")
    return 0


def run(args: argparse.Namespace) -> int:
    """List the tables, or run one and print its table.md."""
    from capnet.experiment import default_cache_dir
    from capnet.reproduce import find_table, run_table

    folder = Path(args.tables_dir) if args.tables_dir else None
    if args.list:
        return list_all(folder)
    if not args.table or not args.out:
        raise CapnetError("name a table and --out DIR (capnet reproduce --list shows the tables)")
    table = find_table(args.table, folder)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    try:
        result = run_table(table, Path(args.out), Path(args.data_root) if args.data_root else None,
                           _weights(args.weights), args.overrides, cache, only=args.rows, resume=not args.no_resume)
    except Interrupted as err:  # reproduce has no --resume flag: it resumes by default
        raise KeyboardInterrupt(f"interrupted in epoch {err.epoch} of a row; rerun the same command to continue "
                                "(finished rows are kept, the row resumes from its last finished epoch)") from None
    print((Path(args.out) / "table.md").read_text())
    failed = [r["name"] for r in result["rows"] if r["status"] == "failed"]
    if failed:
        print(f"capnet: {len(failed)} of {len(result['rows'])} row(s) failed ({', '.join(failed)}); their errors are in "
              f"{Path(args.out) / 'table.md'}. Rerun the same command to retry them (finished rows are kept)", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reproduce`` to the top-level parser."""
    p = subparsers.add_parser(
        "reproduce", help="run one of the paper's tables (configs/tables/) and print it beside the published figures",
        description=__doc__,
        epilog="--set and --weights apply to every row; prefix --set with a row-name glob to aim it "
               "(--set '*.rn50.*:data.batch_size=64'). --rows 'voc_lt.*' runs a subset.")
    p.add_argument("table", nargs="?", help="table name (capnet reproduce --list)")
    p.add_argument("--list", action="store_true", help="list the tables and their rows")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the datasets the table names (VOCdevkit/, coco/, nus_wide/); "
                        "default: each config's data.root")
    p.add_argument("--weights", action="append", default=[], metavar="[BACKBONE=]PATH",
                   help="CLIP weights: rn50=PATH and vit_b16=PATH (or one PATH for every row); default: by name (docs/weights.md)")
    p.add_argument("--out", default=None, metavar="DIR", help="where the run directories, table.md and table.json go")
    p.add_argument("--set", action="append", default=[], metavar="[ROWS:]KEY=VALUE", dest="overrides",
                   help="override a config value on every row (or on the rows matching the ROWS glob)")
    p.add_argument("--rows", action="append", default=[], metavar="GLOB", help="run only the rows matching GLOB (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="rerun finished rows too")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--tables-dir", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
