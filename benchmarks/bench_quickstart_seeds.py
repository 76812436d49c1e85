"""The quickstart's targets over several seeds: one fresh `llama2-hf quickstart --seed N` per seed, one table.

    python benchmarks/bench_quickstart_seeds.py                          # seeds 0-5, one run at a time
    python benchmarks/bench_quickstart_seeds.py --jobs 2 --output_root sweep
    python benchmarks/bench_quickstart_seeds.py --seeds 3 4 -- --scale 0.25   # after --: more quickstart flags
    python benchmarks/bench_quickstart_seeds.py --output_root sweep --table_only   # the table of finished runs

Each seed runs in its own fresh folder `<output_root>/seed_<N>` (an existing one is refused: a resumed run would
skip its finished stages and its time would mean nothing), its console in `<output_root>/seed_<N>.log`. The figures
come from the run's own `results.json` (the targets the quickstart checks, as its report lists them); the wall time
of each run is measured here and kept in `<output_root>/seed_<N>.time.json`. The table has a row per seed: each
target's figure, "ok" or "MISSED", and the wall time. Nothing is asserted: the exit code is 0 once every run has
been tried.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_seed(seed: int, root: Path, extra: list[str]) -> dict:
    folder = root / f"seed_{seed}"
    command = [sys.executable, "-m", "llama2_hf.cli", "quickstart", "--seed", str(seed),
               "--output_dir", str(folder), *extra]
    start = time.perf_counter()
    with open(root / f"seed_{seed}.log", "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    timing = {"seed": seed, "wall_seconds": time.perf_counter() - start, "returncode": code,
              "command": command[1:]}
    (root / f"seed_{seed}.time.json").write_text(json.dumps(timing) + "\n", encoding="utf-8")
    print(f"seed {seed}: exit {code} after {timing['wall_seconds'] / 60:.1f} min", file=sys.stderr, flush=True)
    return timing


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def table(seeds: list[int], root: Path) -> list[str]:
    """A markdown table: a row per seed, a column per target (figure and ok/MISSED), all met, wall time."""
    rows, names, targets = [], [], {}
    for seed in seeds:
        record = read_json(root / f"seed_{seed}" / "results.json") or {"targets": []}
        timing = read_json(root / f"seed_{seed}.time.json") or {}
        found = {t["measurement"]: t for t in record["targets"]}
        for name, t in found.items():
            if name not in names:
                names.append(name)
                targets[name] = t["target"]
        rows.append((seed, found, timing))
    head = ["seed"] + [f"{name} ({targets[name]})" for name in names] + ["all met", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, found, timing in rows:
        cells = [str(seed)]
        for name in names:
            t = found.get(name)
            cells.append("-" if t is None else f"{t['value']} {'ok' if t['met'] else 'MISSED'}")
        done = bool(found) and len(found) == len(names)
        cells.append("-" if not done else "yes" if all(t["met"] for t in found.values()) else "no")
        wall = timing.get("wall_seconds")
        failed = timing.get("returncode") not in (None, 0)
        cells.append(("-" if wall is None else f"{wall / 60:.1f}") + (f" (exit {timing['returncode']})" if failed
                                                                          else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--jobs", type=int, default=1, help="Quickstarts run side by side (each with 1 thread).")
    parser.add_argument("--output_root", type=Path, default=Path("quickstart_seeds"),
                        help="Folder of the runs: seed_<N>/ each, with its console log and wall time beside it.")
    parser.add_argument("--table_only", action="store_true",
                        help="Run nothing; print the table of the runs already in --output_root.")
    args = parser.parse_args(own)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not args.table_only:
        taken = [str(args.output_root / f"seed_{s}") for s in args.seeds if (args.output_root / f"seed_{s}").exists()]
        if taken:
            parser.error(f"not fresh: {', '.join(taken)} (choose another --output_root, or --table_only)")
        args.output_root.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda s: run_seed(s, args.output_root, extra), args.seeds))
    print("\n".join(table(args.seeds, args.output_root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
