"""`jaxlm bench`: the report's fields exist and agree with each other."""

import json
import math
import os

from conftest import CONFIGS, assert_one_line_error, run_jaxlm

from jaxlm import metrics


def test_bench_profile_dir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "f").write_text("")
  proc = run_jaxlm("bench", "--config", os.path.join(CONFIGS, "smoke.py"), "--profile",
                   str(tmp_path / "f"))
  assert_one_line_error(proc, "exists and is not a directory")


def test_bench_smoke_config_reports_consistent_numbers(tmp_path):
  out = tmp_path / "bench.json"
  proc = run_jaxlm("bench", "--config", os.path.join(CONFIGS, "smoke.py"), "--steps", "5",
                   "--json_out", str(out), "--profile", str(tmp_path / "trace"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == r  # Same JSON on stdout.
  for key in ("compile_s", "step_ms_median", "step_ms_p10", "step_ms_p90", "tokens_per_sec",
              "flops_per_token", "achieved_tflops", "peak_tflops", "mfu", "peak_memory_bytes"):
    assert isinstance(r[key], (int, float)) and r[key] > 0, key
  assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
  assert r["tokens_per_step"] == 8 * 16
  assert math.isclose(r["tokens_per_sec"], r["tokens_per_step"] / (r["step_ms_median"] / 1e3),
                      rel_tol=1e-9)
  achieved = r["flops_per_token"] * r["tokens_per_sec"] / 1e12
  assert math.isclose(r["achieved_tflops"], achieved, rel_tol=1e-9)
  assert math.isclose(r["mfu"], r["achieved_tflops"] / r["peak_tflops"], rel_tol=1e-9)
  assert 0 < r["mfu"] <= 1
  # FLOPs/token use the same formula as the training log and the parameter report.
  n_matmul = r["params"] - 16 * 32  # All but the position embeddings (block 16 x d_model 32).
  assert r["flops_per_token"] == metrics.flops_per_token(n_matmul, 2, 32, 16)
  assert "MFU" in proc.stdout and "tokens/s" in proc.stdout
  # Sampling: the config's settings, a quarter of the train batch, half-block prompts.
  assert (r["sample_batch"], r["sample_prompt_tokens"]) == (2, 8)
  assert r["sample_new_tokens"] == 32  # smoke.py sets sample.max_new_tokens = 32.
  assert r["sample_prefill_tokens_per_sec"] > 0 and r["sample_decode_tokens_per_sec"] > 0
  assert "prefill" in proc.stdout and "decode" in proc.stdout
  # The profile names model code (forward and backward) and its shares add up to at most 1.
  profile = r["profile"]
  assert 0 < len(profile) <= 15 and all(p["ms_per_step"] > 0 for p in profile)
  assert sum(p["share"] for p in profile) <= 1 + 1e-9
  assert [p["ms_per_step"] for p in profile] == sorted((p["ms_per_step"] for p in profile),
                                                       reverse=True)
  sources = [p["source"] for p in profile]
  assert any(s.endswith("(bwd)") for s in sources), sources
  assert any(s.startswith("h_*/") for s in sources), sources  # Layers summed over h_0, h_1.
  assert list((tmp_path / "trace").rglob("*.trace.json.gz"))  # Kept for TensorBoard/Perfetto.
  assert "where the step time goes" in proc.stdout
