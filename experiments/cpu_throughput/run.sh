#!/usr/bin/env bash
# Measures the numbers in README.md with `jaxlm bench` (run from the repository root).
# Each line appends one JSON report to experiments/cpu_throughput/results.jsonl.
set -euo pipefail
out=experiments/cpu_throughput/results.jsonl
bench() {  # bench NAME ARGS...
  local name=$1; shift
  jaxlm bench "$@" --json_out /tmp/bench.json > /dev/null
  python3 -c "import json,sys; r=json.load(open('/tmp/bench.json')); r['name']=sys.argv[1]; print(json.dumps(r))" "$name" >> "$out"
}
: > "$out"
# The default experiment: one step per call vs ten, with and without per-layer stats.
bench default        --config configs/shakespeare_char.py --steps 200 --config.train.log_params_every=0
bench default_k10    --config configs/shakespeare_char.py --steps 200 --config.train.log_params_every=0 --config.train.steps_per_call=10
bench default_stats  --config configs/shakespeare_char.py --steps 200
# The large experiment on 1 device, then on 8 fake CPU devices (data parallel and FSDP).
bench large          --config configs/shakespeare_char_large.py --steps 3
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  bench large_8dp    --config configs/shakespeare_char_large.py --steps 3 --config.mesh.rules=dp
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  bench large_8fsdp  --config configs/shakespeare_char_large.py --steps 3 --config.mesh.fsdp=-1 --config.mesh.data=1
# Compile time against depth, unrolled vs nn.scan over layers.
for n in 2 8 16; do
  bench "depth${n}"      --config configs/shakespeare_char.py --steps 2 --config.model.n_layer=$n
  bench "depth${n}_scan" --config configs/shakespeare_char.py --steps 2 --config.model.n_layer=$n --config.model.scan_layers=True
done
