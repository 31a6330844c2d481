"""Build README.md's results table from benchmarks/results/*.json.

Every result file may hold a "headline" list (see benchmarks/harness.py).
This script writes them as one markdown table between the markers
`<!-- results:start -->` and `<!-- results:end -->` in README.md.

Run:
    python -m benchmarks.report            # rewrite README.md's table
    python -m benchmarks.report --print    # only print it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value).replace("|", "/")


def results_table(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    rows = ["| algorithm | setting | metric | ours | reference | seeds | wall s | measured on |",
            "|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        where = f"{record['machine']['cpu']} ({record['machine']['cores']} cores, {record['machine']['platform']})"
        source = f"[{path.stem}](benchmarks/results/{path.name}), {record['date'][:10]}"
        for h in record.get("headline", []):
            rows.append("| " + " | ".join(_cell(h.get(k)) for k in (
                "algorithm", "setting", "metric", "ours", "reference", "seeds", "wall_seconds"))
                + f" | {where}; {source} |")
    return "\n".join(rows)


def update_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{results_table()}\n{END}{tail}")
    print(f"updated {readme.relative_to(ROOT)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", action="store_true", help="print the table instead of writing README.md")
    a = p.parse_args(argv)
    if a.print:
        print(results_table())
    else:
        update_readme()


if __name__ == "__main__":
    main()
