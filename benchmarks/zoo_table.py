"""The README's supported-models table, from the model-zoo parity suite (tests/zoo): runs it with
its results collected, then prints one Markdown row per model — parameters, float64 parity of the
full update and of the sparse scheme (worst scaled error after 3 steps against PyTorch eager) and
compile time at opt-level 0.

    python benchmarks/zoo_table.py [pytest args, e.g. -k llama]
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-9


def collect(pytest_args) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "results.jsonl")
        env = dict(os.environ, POCKENGINE_ZOO_RESULTS=path)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "tests/zoo", *pytest_args],
                       cwd=ROOT, env=env, check=False)
        if not os.path.exists(path):
            return []
        with open(path) as results:
            return [json.loads(line) for line in results]


def table(records: list[dict]) -> str:
    by_model: dict = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["scheme"]] = r
    rows = ["| model | parameters | full update (float64, 3 steps) | biases and norms | compile (s, opt-level 0) |",
            "|---|---|---|---|---|"]
    for model, schemes in by_model.items():
        full = schemes.get("full")
        sparse = schemes.get("biases and norms")

        def cell(r):
            return "—" if r is None else f"{'✓' if r['worst'] <= TOL else '✗'} {r['worst']:.1e}"

        parameters = f"{full['parameters']:,}" if full else "?"
        rows.append(f"| {model} | {parameters} | {cell(full)} | {cell(sparse)} | {full['compile_s'] if full else '?'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(collect(sys.argv[1:])))
