"""μP's coordinate check (Tensor Programs V, section 9 / the mup package's coord_check): train a
few steps at several widths and watch each layer's activation size.

  python experiments/mup_coord_check/run.py --out experiments/mup_coord_check

For sp and for mup (base width = the smallest width), each width trains `--steps` Adam steps
(constant lr, no clipping, no decay) of a 2-layer character model on the shipped
tiny-shakespeare, the same batches at every width. Before the first step and after each one
it records the RMS of each layer's output on a fixed batch: the token embedding (wte), each
block's attention output and MLP output (h_i/attn, h_i/mlp: what they add to the residual
stream) and the logits. Writes

  coord_check.json  RMS[parametrization][layer][step][width] and the slopes
  slopes.md         log-log slope of RMS vs width per layer at the last step, sp and mup
  coord_check.png   RMS vs width, one panel per recorded step, sp above, mup below

Under μP every activation's scale is independent of width after training starts (slopes near
0); under sp the hidden outputs and the logits grow with width. The test
(tests/reliability_mup_test.py) runs it on small widths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import build, defaults
from jaxlm import config as config_lib


def make_config(parametrization: str, width: int, base: int, args):
  c = defaults.base_config()
  c.model.n_layer = args.n_layer
  c.model.n_head = 4
  c.model.d_model = width
  c.model.block_size = args.block
  c.model.parametrization = parametrization
  c.model.mup_base_width = base
  c.optim.lr = args.lr
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0  # A global-norm clip would rescale sp's updates by width.
  c.train.steps = args.steps
  return c


def layer_outputs(intermediates) -> dict[str, jax.Array]:
  """{layer: output} from flax's capture_intermediates (each module's __call__ output)."""
  out = {"wte": intermediates["wte"]["__call__"][0]}
  for name in sorted(k for k in intermediates if k.startswith("h_")):
    block = intermediates[name]
    out[f"{name}/attn"] = block["attn"]["__call__"][0][0]  # (output, cache)
    out[f"{name}/mlp"] = block["mlp"]["__call__"][0]
  out["logits"] = intermediates["__call__"][0]
  return out


def run_width(parametrization: str, width: int, base: int, dataset, args) -> dict[str, list]:
  cfg = make_config(parametrization, width, base, args)
  config_lib.validate_config(cfg)
  recipe = build.make_recipe(cfg, dataset.tokenizer.vocab_size)
  model, tx = recipe.model, recipe.tx
  tokens = jnp.zeros((1, args.block), jnp.int32)
  params = nn.unbox(model.init({"params": jax.random.key(args.seed)}, tokens)["params"])
  opt_state = tx.init(params)
  batch = lambda i: dataset.train_batch(seed=args.seed, step=i, batch_size=args.batch,
                                        block_size=args.block)
  probe = batch(10_000)  # A fixed batch that no step trains on.

  @jax.jit
  def rms(params):
    _, state = model.apply({"params": params}, probe["inputs"], capture_intermediates=True)
    acts = layer_outputs(state["intermediates"])
    return {k: jnp.sqrt(jnp.mean(jnp.square(v.astype(jnp.float32)))) for k, v in acts.items()}

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  history = {}
  for i in range(args.steps + 1):
    for k, v in rms(params).items():
      history.setdefault(k, []).append(float(v))
    if i < args.steps:
      b = batch(i)
      params, opt_state = step(params, opt_state, b["inputs"], b["targets"])
  return history


def slope(widths: list[int], values: list[float]) -> float:
  """Least-squares slope of log RMS against log width: the exponent of RMS ~ width^s."""
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(args) -> dict:
  cfg = make_config("sp", args.widths[0], args.widths[0], args)
  dataset = config_lib.load_dataset(cfg)
  result = {"widths": args.widths, "steps": args.steps, "lr": args.lr, "rms": {}, "slopes": {}}
  for param in ("sp", "mup"):
    per_width = [run_width(param, w, args.widths[0], dataset, args) for w in args.widths]
    layers = list(per_width[0])
    # rms[param][layer][step] = [RMS at each width]
    result["rms"][param] = {k: [[h[k][t] for h in per_width] for t in range(args.steps + 1)]
                            for k in layers}
    result["slopes"][param] = {k: slope(args.widths, result["rms"][param][k][-1])
                               for k in layers}
    print(f"{param}: " + ", ".join(f"{k} {s:+.2f}" for k, s in result["slopes"][param].items()),
          flush=True)
  return result


def write_outputs(result: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "coord_check.json"), "w") as f:
    json.dump(result, f, indent=1)
  layers = list(result["slopes"]["sp"])
  lines = [f"Slope of log RMS vs log width at step {result['steps']} (widths "
           f"{', '.join(map(str, result['widths']))}, Adam lr {result['lr']:g})", "",
           "| layer | sp | mup |", "|---|---|---|"]
  lines += [f"| {k} | {result['slopes']['sp'][k]:+.3f} | {result['slopes']['mup'][k]:+.3f} |"
            for k in layers]
  with open(os.path.join(out, "slopes.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = sorted({0, 1, result["steps"] // 2, result["steps"]})
  fig, axs = plt.subplots(2, len(shown), figsize=(3.2 * len(shown), 6), sharey="row",
                          squeeze=False)
  for row, param in enumerate(("sp", "mup")):
    for col, t in enumerate(shown):
      ax = axs[row][col]
      for k in layers:
        ax.plot(result["widths"], result["rms"][param][k][t], marker="o", label=k)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{param}, step {t}")
      ax.set_xlabel("width (d_model)")
      if col == 0:
        ax.set_ylabel("activation RMS")
  axs[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "coord_check.png"), dpi=110)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--widths", default="64,128,256,512,1024",
                 type=lambda s: [int(w) for w in s.split(",")])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--n_layer", type=int, default=2)
  p.add_argument("--block", type=int, default=32)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="experiments/mup_coord_check")
  args = p.parse_args(argv)
  write_outputs(coord_check(args), args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
