"""The README's supported-models table, from the model-zoo parity suite (tests/zoo): runs it with
its results collected, then prints one Markdown row per model — parameters, float64 parity of the
full update and of the model's sparse scheme (worst scaled error after 3 steps against PyTorch
eager), 20 float32 steps (worst scaled error against PyTorch's float32 run, and how far each is
from the exact float64 trajectory) and compile time at opt-level 0.

    python benchmarks/zoo_table.py [--keep results.jsonl] [pytest args, e.g. -k llama or -n 2]

It sets POCKENGINE_ZOO=all: every model gets all three checks (CI runs a subset, tests/zoo/zoo_parity.py).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-9


def collect(pytest_args, keep: str | None = None) -> list[dict]:
    """Run the zoo; `keep`: also copy its results (JSON lines) to this file."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "results.jsonl")
        env = dict(os.environ, POCKENGINE_ZOO_RESULTS=path, POCKENGINE_ZOO="all")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "tests/zoo", *pytest_args],
                       cwd=ROOT, env=env, check=False)
        if not os.path.exists(path):
            return []
        if keep:
            shutil.copyfile(path, keep)
        with open(path) as results:
            return [json.loads(line) for line in results]


def _float64_cell(record):
    if record is None:
        return "—"
    return f"{'✓' if record['worst'] <= TOL else '✗'} {record['worst']:.1e}"


def _float32_cell(record):
    if record is None:
        return "—"
    mark = "✓" if record["worst"] <= record["bound"] else "✗"
    return f"{mark} {record['worst']:.1e} ({record['ours_drift']:.1e} / {record['torch_drift']:.1e})"


def table(records: list[dict]) -> str:
    by_model: dict = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["check"]] = r
    rows = ["| model | from | parameters | full update (float64, 3 steps) | sparse scheme (float64, 3 steps) | "
            "float32, 20 steps: vs PyTorch (drift ours / PyTorch's) | compile (s, opt-level 0) |",
            "|---|---|---|---|---|---|---|"]
    source = {model: next(iter(checks.values())).get("source", "") for model, checks in by_model.items()}
    for model in sorted(by_model, key=lambda m: (source[m], m)):
        checks = by_model[model]
        full, sparse, float32 = checks.get("full"), checks.get("sparse"), checks.get("float32")
        parameters = f"{full['parameters']:,}" if full else "?"
        scheme = "—" if sparse is None else f"{_float64_cell(sparse)} {sparse['scheme']}"
        rows.append(f"| {model} | {source[model]} | {parameters} | {_float64_cell(full)} | {scheme} | "
                    f"{_float32_cell(float32)} | {full['compile_s'] if full else '?'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    args = sys.argv[1:]
    keep = None
    if args[:1] == ["--keep"]:
        keep, args = args[1], args[2:]
    print(table(collect(args, keep)))
