#!/usr/bin/env bash
# Measures the numbers in README.md with `jaxlm bench` (run from the repository root).
# The rows as configured use host_allocator=auto: tcmalloc here (apt install libtcmalloc-minimal4);
# the *_system_malloc rows are the same runs with glibc's malloc.
# Each line appends one JSON report to experiments/cpu_throughput/results.jsonl.
set -euo pipefail
out=experiments/cpu_throughput/results.jsonl
bench() {  # bench NAME ARGS...
  local name=$1; shift
  jaxlm bench "$@" --json_out /tmp/bench.json > /dev/null
  python3 -c "import json,sys; r=json.load(open('/tmp/bench.json')); r['name']=sys.argv[1]; print(json.dumps(r))" "$name" >> "$out"
}
: > "$out"
# The default experiment: one step per call vs ten; XLA's default flags vs xla_flags=auto.
for i in 1 2; do
  bench default_k1_xla_defaults --config configs/shakespeare_char.py --steps 300 --nosampling --config.train.steps_per_call=1 --config.xla_flags=
  bench default_xla_defaults    --config configs/shakespeare_char.py --steps 300 --nosampling --config.xla_flags=
  bench default               --config configs/shakespeare_char.py --steps 300
  bench default_system_malloc --config configs/shakespeare_char.py --steps 300 --nosampling --config.host_allocator=system
done
# The large experiment: XLA's flags and threefry masks, then each change, then no dropout.
bench large_xla_defaults_threefry --config configs/shakespeare_char_large.py --steps 3 --nosampling --config.xla_flags= --config.train.dropout_rng=threefry2x32
bench large_threefry              --config configs/shakespeare_char_large.py --steps 3 --nosampling --config.train.dropout_rng=threefry2x32
bench large_rbg                   --config configs/shakespeare_char_large.py --steps 3 --nosampling --config.train.dropout_rng=rbg
for i in 1 2; do
  bench large                     --config configs/shakespeare_char_large.py --steps 8
  bench large_system_malloc       --config configs/shakespeare_char_large.py --steps 8 --nosampling --config.host_allocator=system
done
bench large_no_dropout            --config configs/shakespeare_char_large.py --steps 3 --nosampling --config.model.dropout=0.0
# 8 fake CPU devices (the same 2 cores): the cost of partitioning, not a speed-up.
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  bench large_8dp    --config configs/shakespeare_char_large.py --steps 3 --nosampling --config.mesh.rules=dp
# Compile time against depth, unrolled vs nn.scan over layers.
for n in 2 8 16; do
  bench "depth${n}"      --config configs/shakespeare_char.py --steps 2 --nosampling --config.model.n_layer=$n
  bench "depth${n}_scan" --config configs/shakespeare_char.py --steps 2 --nosampling --config.model.n_layer=$n --config.model.scan_layers=True
done
