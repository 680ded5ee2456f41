"""Print the tables of one or more benchmark JSON files as GitHub markdown (for docs/PERFORMANCE.md).

    python benchmarks/to_markdown.py bench_out/train_throughput.json [--tables compute,epoch] [--columns a,b,c]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--tables", default=None, help="comma-separated table keys (default: all)")
    p.add_argument("--columns", default=None, help="comma-separated columns (default: all of the first row)")
    args = p.parse_args(argv)
    for f in args.files:
        payload = json.loads(f.read_text())
        m = payload["machine"]
        print(f"<!-- {f}: {payload['command']} -->")
        print(
            f"*{payload['benchmark']}*, {m['date_utc']}, {m['cpu']} ({m['cpu_count']} cores, "
            f"torch {m['torch']}, {m['torch_threads']} threads), load avg {payload['loadavg_start']} -> "
            f"{payload.get('loadavg_end')}, wall {payload.get('wall_s')} s\n"
        )
        wanted = args.tables.split(",") if args.tables else list(payload["tables"])
        for key in wanted:
            rows = payload["tables"].get(key) or []
            if not rows:
                continue
            cols = args.columns.split(",") if args.columns else None
            if cols:
                cols = [c for c in cols if c in rows[0]]
            print(f"**{key}**\n")
            print(C.markdown_table(rows, cols))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
