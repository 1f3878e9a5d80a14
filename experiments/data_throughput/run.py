"""`jaxlm prepare` against the tokenizer library alone, on 40 and 160 MB of real text.

  python experiments/data_throughput/run.py [--workdir /tmp/data_throughput] [--sizes 40,160]

1. Builds a corpus from the text files of the installed Python packages (.py, .pyi, .md, .rst,
   .txt under site-packages, in sorted order, skipping what is not UTF-8): JSONL shards of
   20 MB, one file per record, as FineWeb-style corpora come. The first 40 MB is the first two
   shards of the 160 MB one.
2. Trains one byte-level BPE (vocab 8192, with <|endoftext|>) on the first 20 MB and saves its
   tokenizer.json, so both sides encode with the same tokenizer and neither counts training.
3. For each size, in one run, alternating, each in a fresh process:
   - prepare:  `jaxlm prepare` with data.tokenizer=tokenizer.json, writing the token store;
   - baseline: Hugging Face tokenizers alone, reading the same shards in batches of 8 MB of
     documents (json.loads per line) and calling encode_batch (and encode_batch_fast, its
     variant without offsets) on each, keeping nothing.
   It prints and saves MB/s (of document text), tokens/s, wall time and peak RSS (the child's
   ru_maxrss, from wait4).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import site
import subprocess
import sys
import tempfile
import textwrap
import time

SHARD_BYTES = 20 << 20
EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt")

BASELINE = textwrap.dedent("""
    import glob, json, sys, time
    import tokenizers
    files, tok_path, method = sys.argv[1:4]
    tok = tokenizers.Tokenizer.from_file(tok_path)
    encode = getattr(tok, method)
    t0 = time.perf_counter()
    n_bytes = n_tokens = 0
    def flush(batch):
      global n_tokens
      n_tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
    for path in sorted(glob.glob(files)):
      batch, size = [], 0
      with open(path, "rb") as f:
        for line in f:
          text = json.loads(line)["text"]
          batch.append(text)
          size += len(text.encode("utf-8"))
          if size >= 8 << 20:
            flush(batch)
            n_bytes += size
            batch, size = [], 0
      if batch:
        flush(batch)
        n_bytes += size
    print(json.dumps({"bytes": n_bytes, "tokens": n_tokens, "seconds": time.perf_counter() - t0}))
""")

CONFIG = textwrap.dedent("""
    from jaxlm import defaults

    def get_config():
      c = defaults.base_config()
      c.data.sources.code = defaults.source({files!r})
      c.data.tokenizer = {tokenizer!r}
      c.data.store = {store!r}
      c.data.val_fraction = 0.01
      return c
""")


def build_corpus(out_dir: str, total_bytes: int) -> list[str]:
  """JSONL shards of the site-packages text files, until total_bytes of text."""
  os.makedirs(out_dir, exist_ok=True)
  done = sorted(glob.glob(os.path.join(out_dir, "shard-*.jsonl")))
  if len(done) * SHARD_BYTES >= total_bytes:
    return done
  roots = sorted({p for p in site.getsitepackages() + [site.getusersitepackages()]
                  if os.path.isdir(p)})
  shards, size, f, written = [], 0, None, 0
  for root in roots:
    for d, dirs, names in os.walk(root):
      dirs.sort()
      for name in sorted(names):
        if not name.endswith(EXTENSIONS):
          continue
        try:
          text = open(os.path.join(d, name), encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
          continue
        if not text.strip():
          continue
        if f is None or size >= SHARD_BYTES:
          if f:
            f.close()
          if written >= total_bytes:
            return shards
          shards.append(os.path.join(out_dir, f"shard-{len(shards):03d}.jsonl"))
          f, size = open(shards[-1], "w", encoding="utf-8"), 0
        f.write(json.dumps({"text": text}) + "\n")
        n = len(text.encode("utf-8"))
        size, written = size + n, written + n
  if f:
    f.close()
  if written < total_bytes:
    raise SystemExit(f"only {written / 1e6:.0f} MB of text in site-packages; need "
                     f"{total_bytes / 1e6:.0f}")
  return shards


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, int, str, str]:
  """(wall seconds, peak RSS bytes, stdout, stderr) of a child process (its own rusage)."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # Reaped here, so its rusage is its own.
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  if proc.returncode:
    raise SystemExit(f"{argv[:3]} failed:\n{stderr[-3000:]}")
  return wall, usage.ru_maxrss * 1024, stdout, stderr


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="/tmp/data_throughput")
  ap.add_argument("--sizes", default="40,160", help="MB of text, comma-separated")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  here = os.path.dirname(os.path.abspath(__file__))
  work = args.workdir
  os.makedirs(work, exist_ok=True)
  shards = build_corpus(os.path.join(work, "corpus"), max(sizes) << 20)
  print(f"corpus: {len(shards)} shards, {sum(map(os.path.getsize, shards)) / 1e6:.0f} MB "
        "of JSONL", flush=True)

  tok_path = os.path.join(work, "tokenizer.json")
  if not os.path.exists(tok_path):
    from jaxlm import tokenizers
    sample = open(shards[0], encoding="utf-8").read()
    texts = [json.loads(line)["text"] for line in sample.splitlines()]
    tok = tokenizers.BpeTokenizer.train(texts, 8192, eot=True)
    tok.hf.save(tok_path)

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  rows = []
  for mb in sizes:
    n = max(1, (mb << 20) // SHARD_BYTES)
    files = os.path.join(work, f"corpus-{mb}", "shard-*.jsonl")
    os.makedirs(os.path.dirname(files), exist_ok=True)
    for s in shards[:n]:  # A view of the first n shards, by symlink.
      link = os.path.join(os.path.dirname(files), os.path.basename(s))
      if not os.path.exists(link):
        os.symlink(s, link)
    for rep in range(args.repeats):
      store = os.path.join(work, f"store-{mb}")
      subprocess.run(["rm", "-rf", store], check=True)
      cfg = os.path.join(work, f"prepare_{mb}.py")
      with open(cfg, "w") as f:
        f.write(CONFIG.format(files=files, tokenizer=tok_path, store=store))
      wall, rss, _, err = run_child([sys.executable, "-m", "jaxlm.cli", "prepare",
                                     f"--config={cfg}"], env)
      manifest = [json.load(open(os.path.join(store, s, "manifest.json")))
                  for s in ("train", "val")]
      text = sum(m["totals"]["text_bytes"] for m in manifest)
      tokens = sum(m["totals"]["tokens"] - m["totals"]["documents"] for m in manifest)
      rows.append({"size_mb": mb, "method": "jaxlm prepare", "repeat": rep, "wall_s": wall,
                   "text_mb": text / 1e6, "mb_per_s": text / 1e6 / wall,
                   "tokens_per_s": tokens / wall, "tokens": tokens, "peak_rss_mb": rss / 1e6})
      print(json.dumps(rows[-1]), flush=True)
      for method in ("encode_batch", "encode_batch_fast"):
        wall, rss, out, _ = run_child([sys.executable, "-c", BASELINE, files, tok_path, method],
                                      env)
        r = json.loads(out)
        rows.append({"size_mb": mb, "method": f"tokenizers {method}", "repeat": rep,
                     "wall_s": wall, "text_mb": r["bytes"] / 1e6,
                     "mb_per_s": r["bytes"] / 1e6 / wall, "tokens_per_s": r["tokens"] / wall,
                     "tokens": r["tokens"], "peak_rss_mb": rss / 1e6})
        print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(here, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  print("\n| corpus | method | MB/s | tokens/s | wall s | peak RSS MB |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size_mb']} MB | {r['method']} (run {r['repeat'] + 1}) | {r['mb_per_s']:.2f} | "
          f"{r['tokens_per_s'] / 1e6:.2f}M | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
  main()
