"""Run a lanner command with the GEMV table's one-row candidates widened by the winners of a
scripts/gemv_probe.py run, to time them in the engine before they join the list
(lanner/executor/gemv_table.py ONE_ROW_CANDIDATES; its key hashes the list, so a new table is measured).

  python scripts/gemv_extra_candidates.py PROBE.json [TOP] -- bench latency --config ... (lanner's arguments)

TOP (default 2): each one-row shape's best configurations that the list lacks, fused or unfused."""
import json
import sys

from lanner.cli import main
from lanner.executor import gemv_table


def parse(name: str) -> tuple[int, ...]:
    """GemvConfig's str ("n4-k1024-s1-w8-st3") as its tuple."""
    return tuple(int(part.lstrip("nkswt")) for part in name.removeprefix(gemv_table.UNFUSED).split("-"))


def widened(probe: dict, top: int) -> list[tuple[int, ...]]:
    extra = []
    for name, shape in probe["shapes"].items():
        if "/m1/" not in name:
            continue
        missing = [c for c in map(parse, shape["top5"]) if c not in gemv_table.ONE_ROW_CANDIDATES]
        extra += [c for c in missing[:top] if c not in extra]
    return extra


if __name__ == "__main__":
    split = sys.argv.index("--")
    own, argv = sys.argv[1:split], sys.argv[split + 1:]
    with open(own[0]) as f:
        extra = widened(json.load(f), int(own[1]) if len(own) > 1 else 2)
    print("extra one-row candidates:", extra, flush=True)
    gemv_table.ONE_ROW_CANDIDATES = gemv_table.ONE_ROW_CANDIDATES + extra
    sys.exit(main(argv))
