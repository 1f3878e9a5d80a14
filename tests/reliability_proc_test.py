"""Issue 23, items 3, 13, 16, 17 and 18: one workdir, one run; Ctrl-C and huge requests in
`jaxlm sample`; launch, sweep and tokenizer input; signals before the loop; TPU script quoting.
"""

import os
import stat
import subprocess

from jaxlm.host import tpu_commands


# --- 18. `jaxlm tpu --tpu_jax` is one shell word on the workers, never code ----------------------
def _fake(path, script: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("#!/bin/sh\n" + script)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_tpu_jax_payload_is_quoted_in_the_install_script(tmp_path):
  marker = tmp_path / "pwned"
  payload = f"jax[tpu]$(touch {marker})`touch {marker}`\"; touch {marker}; \""
  s = tpu_commands.make_slice("lm1", "us-central2-b", "v4-8")
  setup = tpu_commands.Setup(repo_dir=str(tmp_path), repo_url="https://example.com/j.git",
                             jax=payload)
  script = tpu_commands.setup_commands(s, setup)[-1][-1]  # The --command of the install ssh.
  # Run it as a worker would, with pip and uv faked: uv records the arguments it was given.
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  _fake(str(bin_dir / "python3"), "exit 0\n")
  _fake(str(home / ".local" / "bin" / "uv"),
        f'for a in "$@"; do printf "%s\\n" "$a"; done >> {tmp_path / "uv_args"}\n')
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
  proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert not marker.exists(), "the --tpu_jax payload ran on the worker"
  assert payload in (tmp_path / "uv_args").read_text().splitlines()
