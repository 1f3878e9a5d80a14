"""README promises: its test command is the one CI runs, and its install extras match CI's."""

import os
import re

from conftest import REPO


def read(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
  readme, ci = read("README.md"), read(".ci/run")
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  train_cmd = [line for line in blocks[0].splitlines() if not line.startswith("#")][0]
  test_cmd = [line for line in blocks[1].splitlines() if not line.startswith("#")][0]
  assert "python3 -m venv" in train_cmd and "jaxlm train --config configs/shakespeare_char.py" in (
      train_cmd)
  pytest_cmd = "python -m pytest -q -n 2 --dist loadfile"
  assert test_cmd.endswith(pytest_cmd)
  assert pytest_cmd + "\n" in ci
  # CI installs exactly what the README's test command installs.
  assert re.findall(r"pip install (\S+==\S+)", test_cmd) == re.findall(
      r"pip install --quiet (\S+==\S+)", ci)
  assert "-e '.[dev,hf]'" in test_cmd and "-e '.[dev,hf]'" in ci
