"""Reruns every hostile case of issue 23 (and the neighbours found since): one row per case.

  python experiments/robustness/run.py            # every case
  python experiments/robustness/run.py -k lock    # cases whose name contains "lock"

Exits non-zero when any case regresses (wrong exit code, a traceback, more than the allowed
lines after the log, or the workdir's saved state not intact). Cases live in cases_*.py beside
this file, one module per area; harness.py holds the format.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402


def all_cases() -> list[harness.Case]:
  cases = []
  for path in sorted(glob.glob(os.path.join(HERE, "cases_*.py"))):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases.extend(module.CASES)
  return cases


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("-k", default="", help="run only cases whose name contains this")
  args = parser.parse_args()
  cases = [c for c in all_cases() if args.k in c.name]
  print(f"{'case':<52} {'item':>4} {'rc':>4} {'lines':>6}  {'state':<10} result")
  failed = 0
  for i, case in enumerate(cases, 1):
    row = harness.run_case(case)
    failed += not row["ok"]
    print(f"{row['case']:<52} {row['item']:>4} {row['rc']:>4} {row['lines']:>6}  "
          f"{row['state'] if row['state'] == 'intact' else 'DAMAGED':<10} "
          f"{'ok' if row['ok'] else 'FAIL: ' + row['why']}  [{i}/{len(cases)}, "
          f"{row['sec']:.0f}s]", flush=True)
  print(f"{len(cases) - failed} of {len(cases)} cases hold up")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
