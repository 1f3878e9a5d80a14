"""Parameter groups, every optimizer and schedule end to end: assignment, lr_mult and weight
decay per group, schedule-free evaluation params, exact resume, `jaxlm params`, bad input."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_one_line_error, load_config, run_jaxlm

from jaxlm import build as build_lib
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import defaults, evaluate, optim, runs, sharding, train
from jaxlm import model as model_lib
from jaxlm import step as step_lib
from jaxlm.errors import JaxlmError

VOCAB = 65  # The char vocabulary of tiny-shakespeare, which the smoke config trains on.


def smoke(groups=None, **optim_overrides):
  cfg = load_config("smoke")
  cfg.optim.update(optim_overrides)
  for name, g in (groups or {}).items():
    cfg.optim.groups[name] = g
  return cfg


def paths_of(tree):
  return {model_lib.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_state(recipe):
  # Jitted: one compilation instead of an op-by-op init (seconds on a small CPU).
  return jax.jit(lambda rng: nn.unbox(step_lib.init_boxed_state(
      rng, model=recipe.model, tx=recipe.tx)))(jax.random.key(0))


def random_batch(seed=0):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(8, 17))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def optimize(cfg, n):
  """(initial params, params after n jitted optimizer updates with random gradients)."""
  recipe = build_lib.make_recipe(cfg, VOCAB)
  params = init_state(recipe).params

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = recipe.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(0)
  new, opt_state = params, jax.jit(recipe.tx.init)(params)
  for _ in range(n):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    new, opt_state = update(new, opt_state, grads)
  return params, new


def train_steps(cfg, n, batch_fn=random_batch):
  """(initial state, final state, losses) of n jitted train steps on one device."""
  recipe = build_lib.make_recipe(cfg, VOCAB)
  step = jax.jit(functools.partial(step_lib.train_step, model=recipe.model, tx=recipe.tx))
  state0 = state = init_state(recipe)
  losses = []
  for i in range(n):
    state, m = step(state, batch_fn(i), jax.random.key(1))
    losses.append(float(m["loss"]))
  return state0, state, losses


# --- Assignment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_roles_cover_every_tensor_and_the_muon_recipe_assigns_each_once(family):
  cfg = smoke(name="muon")
  cfg.model.family = family
  recipe = build_lib.make_recipe(cfg, VOCAB)
  boxed = jax.eval_shape(lambda r: model_lib.init_params(recipe.model, r), jax.random.key(0))
  tensors = optim.params_of(boxed)
  roles = {p.path: p.role for p in tensors}
  assert all(r in optim.ROLES for r in roles.values())
  assert roles["wte/embedding"] == "embeddings" and roles["h_0/mlp/fc/kernel"] == "matrices"
  assert roles["h_1/ln_2/scale"] == "norms"
  if family == "llama":  # Untied head, RMSNorm, no biases.
    assert roles["lm_head/kernel"] == "head" and "biases" not in roles.values()
  else:
    assert roles["h_0/attn/query/bias"] == "biases" and roles["wpe/embedding"] == "embeddings"
  assigned = [p.path for g in recipe.groups for p in g.params]
  assert sorted(assigned) == sorted(roles)  # Every tensor, each exactly once.
  muon, adamw = recipe.groups
  assert (muon.optimizer, adamw.optimizer) == ("muon", "adamw")
  assert {roles[p.path] for p in muon.params} == {"matrices"}
  assert "matrices" not in {roles[p.path] for p in adamw.params}
  assert muon.n_params + adamw.n_params == model_lib.count_params(nn.unbox(boxed))


def test_groups_by_regex_and_roles_partition_the_params():
  cfg = smoke({
      "first": defaults.group(match=r"^h_0/", roles="matrices", optimizer="muon"),
      "later": defaults.group(match=r"^h_1/", roles="matrices", lr_mult=0.5),
      "rest": defaults.group(roles="embeddings,norms,biases", weight_decay=0.0)})
  groups = {g.name: g for g in build_lib.make_recipe(cfg, VOCAB).groups}
  first = {p.path for p in groups["first"].params}
  assert first == {f"h_0/{m}/kernel" for m in
                   ("attn/query", "attn/key_value", "attn/out", "mlp/fc", "mlp/proj")}
  assert all(p.path.startswith("h_1/") for p in groups["later"].params)
  assert groups["later"].lr_mult == 0.5 and groups["rest"].weight_decay == 0.0
  assert len(groups["first"].params) + len(groups["later"].params) + len(
      groups["rest"].params) == 32


def test_one_catch_all_group_is_exactly_the_single_optimizer():
  """Grouping adds no math: one adamw group over everything updates bit for bit as no groups."""
  _, plain = optimize(smoke(warmup_steps=0), 3)
  _, grouped = optimize(smoke({"all": defaults.group(match=".")}, warmup_steps=0), 3)
  jax.tree.map(np.testing.assert_array_equal, plain, grouped)


@pytest.mark.parametrize("hidden", ["adamw", "muon"])
def test_lr_mult_zero_freezes_its_group_and_only_it(hidden):
  cfg = smoke({"hidden": defaults.group(roles="matrices", optimizer=hidden),
               "frozen": defaults.group(roles="embeddings,norms,biases", lr_mult=0.0)},
              warmup_steps=0)
  before, after = optimize(cfg, 2)
  roles = {p.path: p.role for p in optim.params_of(before)}
  old, new = paths_of(before), paths_of(after)
  for path, role in roles.items():
    if role == "matrices":
      assert not np.array_equal(old[path], new[path]), path
    else:
      np.testing.assert_array_equal(old[path], new[path], err_msg=path)


def test_a_groups_weight_decay_reaches_its_tensors_only():
  """Zero gradients: the whole adamw update is -lr * wd * p, so only the decayed group moves,
  all of its tensors (biases and scales too: an explicit decay means every tensor)."""
  lr, wd = 0.1, 0.5
  cfg = smoke({"decayed": defaults.group(roles="norms,biases", weight_decay=wd),
               "kept": defaults.group(roles="matrices,embeddings", weight_decay=0.0)},
              lr=lr, min_lr=lr, warmup_steps=0)
  recipe = build_lib.make_recipe(cfg, VOCAB)
  params = init_state(recipe).params
  params = jax.tree.map(lambda x: x + 1.0, params)  # Biases start at 0: make decay visible.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(recipe.tx.update)(zeros, jax.jit(recipe.tx.init)(params), params)
  new = paths_of(optax.apply_updates(params, updates))
  for p in optim.params_of(params):
    before = paths_of(params)[p.path]
    if p.role in ("norms", "biases"):
      np.testing.assert_allclose(new[p.path], before * (1 - lr * wd), rtol=1e-6)
    else:
      np.testing.assert_array_equal(new[p.path], before)


# --- Every schedule trains the smoke config -------------------------------------------------------

def shakespeare_batches(cfg):
  dataset = config_lib.load_dataset(cfg)
  return lambda i: {k: jnp.asarray(v) for k, v in dataset.train_batch(
      seed=0, step=i, batch_size=8, block_size=16, process_index=0, process_count=1).items()}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [s for s in optim.SCHEDULES if s != "cosine"])
def test_each_schedule_trains_the_smoke_config(schedule):
  cfg = smoke(schedule=schedule)  # cosine, the default: every optimizer's test below.
  _, _, losses = train_steps(cfg, 30, shakespeare_batches(cfg))
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses


# --- Schedule-free: evaluation and checkpoints use the averaged params ----------------------------

@pytest.mark.slow
def test_schedule_free_evaluates_and_saves_its_averaged_params(tmp_path):
  cfg = smoke(name="schedule_free_adamw")
  cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = 8, 8, 8
  workdir = str(tmp_path / "sf")
  final = train.train_and_evaluate(cfg, workdir)
  setup = build_lib.build(cfg, VOCAB)
  target = setup.training.abstract_state
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  saved = ckpt.restore(8, {"params": target.params, "train_params": target.params,
                           "opt_state": target.opt_state})
  ckpt.close()
  state = step_lib.TrainState(step=jnp.asarray(8), params=saved["train_params"],
                              opt_state=saved["opt_state"])
  # "params" is optax's schedule_free_eval_params of the saved state, not the iterate.
  want = optax.contrib.schedule_free_eval_params(saved["opt_state"][1], saved["train_params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               saved["params"], want)
  assert not np.allclose(saved["params"]["h_0"]["mlp"]["fc"]["kernel"],
                         saved["train_params"]["h_0"]["mlp"]["fc"]["kernel"])
  # The run's val loss is the loss of those params, which `jaxlm eval` reads back too.
  again = runs.evaluate_run(workdir)
  np.testing.assert_allclose(again["val/loss"], final["val/loss"], rtol=1e-5)
  dataset = config_lib.load_dataset(cfg)
  batches = evaluate.stack(dataset.eval_sets()["val"](
      seed=cfg.seed, step=i, batch_size=8, block_size=16) for i in range(cfg.train.eval_steps))
  eval_fn = jax.jit(functools.partial(evaluate.eval_steps, model=setup.model))
  on_iterate = evaluate.evaluate(eval_fn, jax.device_get(state.params), batches)["loss"]
  assert abs(on_iterate - final["val/loss"]) > 1e-4


# --- Every optimizer trains, and resumes exactly --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_trains_the_smoke_config_and_resumes_bitwise(tmp_path, name):
  """24 steps straight vs 12 steps, save, restore (train.save / train.restore_or_init), 12
  more: the loss falls, and both end with the same params and optimizer state to the bit."""
  # SGD's steps are the raw gradient's size: it needs a far larger lr than the adaptive ones.
  cfg = smoke(name=name, lr=0.5 if name == "sgd" else 3e-3)
  cfg.model.dropout = 0.1  # The step's rng must come from the restored step, too.
  recipe = build_lib.make_recipe(cfg, VOCAB)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.get_rules("fsdp")
  training = build_lib.make_sharded_training(recipe.model, recipe.tx, mesh, rules,
                                             schedule_free=recipe.schedule_free)
  init_rng, dropout_rng = step_lib.init_rngs(cfg.seed)
  setup = build_lib.Setup(recipe=recipe, mesh=mesh, rules=rules, training=training,
                          init_rng=init_rng, dropout_rng=dropout_rng)
  batch_of = shakespeare_batches(cfg)
  losses = []

  def advance(state, start, stop):
    for i in range(start, stop):
      batch = sharding.host_to_global({k: np.asarray(v)[None] for k, v in batch_of(i).items()},
                                      training.batch_sharding)
      state, m = training.steps(state, batch, dropout_rng)
      losses.append(float(m["loss"][0]))
    return state

  whole = jax.device_get(advance(training.init(init_rng), 0, 24))
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0] - 0.5, losses
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
  train.save(ckpt, training, advance(training.init(init_rng), 0, 12), 12, {}, None)
  ckpt.wait()
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
  resumed, step = train.restore_or_init(setup, ckpt, ckpt.latest_step(), "", {})
  ckpt.close()
  assert int(resumed.step) == step == 12
  parts = jax.device_get(advance(resumed, 12, 24))
  jax.tree.map(np.testing.assert_array_equal, whole.params, parts.params)
  jax.tree.map(np.testing.assert_array_equal, whole.opt_state, parts.opt_state)


# --- Bad input: one line each, before anything compiles -------------------------------------------

GOOD_REST = defaults.group(roles="embeddings,norms,biases")


@pytest.mark.parametrize("overrides, groups, message", [
    (dict(name="adam"), None, "unknown optim.name='adam': expected one of adamw, lion, sgd, "
                              "adafactor, muon, schedule_free_adamw"),
    (dict(schedule="step"), None, "unknown optim.schedule='step': expected one of cosine, linear, "
                                  "constant, wsd"),
    (dict(decay_shape="exp"), None, "unknown optim.decay_shape='exp'"),
    (dict(decay_fraction=1.5), None, "optim.decay_fraction=1.5 must be in [0, 1]"),
    (dict(decay_fraction=-0.1), None, "must be in [0, 1]"),
    ({}, {"m": defaults.group(roles="matrices", optimizer="sgdw"), "r": GOOD_REST},
     "unknown optim.groups.m.optimizer='sgdw': expected one of adamw"),
    ({}, {"m": defaults.group(roles="matrices", lr_mult=-1.0), "r": GOOD_REST},
     "optim.groups.m.lr_mult=-1.0 must be >= 0"),
    ({}, {"m": defaults.group(roles="kernels"), "r": GOOD_REST},
     "unknown role 'kernels' in optim.groups.m.roles: expected one of matrices, embeddings"),
    ({}, {"m": defaults.group(), "r": GOOD_REST}, "optim.groups.m selects nothing"),
    ({}, {"m": defaults.group(match="h_0/(", roles="matrices"), "r": GOOD_REST},
     "optim.groups.m.match='h_0/(' is not a regex"),
])
def test_bad_optim_config_is_one_line_error_in_validate_config(overrides, groups, message):
  cfg = smoke(groups, **overrides)
  with pytest.raises(JaxlmError) as e:
    config_lib.validate_config(cfg)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("groups, message", [
    ({"m": defaults.group(roles="matrices")},
     "optim.groups: parameter h_0/attn/key_value/bias (role biases) is in no group (groups: m)"),
    ({"m": defaults.group(roles="matrices"), "first": defaults.group(match="^h_0/"),
      "r": GOOD_REST},
     "parameter h_0/attn/key_value/bias is in groups first and r"),
    ({"m": defaults.group(roles="matrices"), "r": GOOD_REST, "head": defaults.group(roles="head")},
     "optim.groups.head (roles='head') matches no parameter"),  # The smoke model ties its head.
    ({"m": defaults.group(roles="matrices,norms", optimizer="muon"),
      "r": defaults.group(roles="embeddings,biases")},
     "optim.groups.m uses muon but holds h_0/ln_1/scale of shape (32,), which is not a matrix"),
])
def test_bad_groups_are_one_line_errors_before_compiling(groups, message):
  cfg = smoke(groups)
  config_lib.validate_config(cfg)  # Only the model's params can tell.
  with pytest.raises(JaxlmError) as e:
    build_lib.make_recipe(cfg, VOCAB)
  assert message in str(e.value) and "\n" not in str(e.value)


# --- jaxlm params: groups and the schedule plot ---------------------------------------------------

GROUPED_CONFIG = '''
from jaxlm import defaults


def get_config():
  c = defaults.base_config()
  c.model.n_layer, c.model.n_head, c.model.d_model, c.model.block_size = 2, 4, 32, 16
  c.train.steps, c.train.batch_size = 200, 8
  c.optim.schedule, c.optim.warmup_steps = "wsd", 20
  c.optim.groups.hidden = defaults.group(roles="matrices", optimizer="muon")
  c.optim.groups.tables = defaults.group(roles="embeddings", lr_mult=0.5)
  c.optim.groups.vectors = defaults.group(roles="norms,biases", weight_decay=0.0)
  return c
'''


@pytest.mark.slow
def test_jaxlm_params_shows_the_groups_and_plots_the_schedule(tmp_path):
  config = tmp_path / "grouped.py"
  config.write_text(GROUPED_CONFIG)
  png = tmp_path / "lr.png"
  proc = run_jaxlm("params", "--config", str(config), "--plot_lr", str(png))
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  header = next(line for line in lines if line.lstrip().startswith("path "))
  assert header.rstrip().endswith("group")
  row = lambda path: next(line for line in lines if line.lstrip().startswith(path + " "))
  assert row("h_0/mlp/fc/kernel").rstrip().endswith("hidden")
  assert row("wte/embedding").rstrip().endswith("tables")
  assert row("ln_f/scale").rstrip().endswith("vectors")
  section = lines.index(next(line for line in lines if line.startswith("Optimizer groups")))
  table = "\n".join(lines[section:section + 5])
  assert "hidden   muon" in table and "tables   adamw" in table and "0.5" in table
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  config.write_text(GROUPED_CONFIG.replace('roles="norms,biases"', 'roles="norms"'))
  assert_one_line_error(run_jaxlm("params", "--config", str(config)),
                        "parameter h_0/attn/key_value/bias (role biases) is in no group")
  assert_one_line_error(
      run_jaxlm("train", "--config", str(config), "--workdir", str(tmp_path / "w"),
                "--config.optim.decay_fraction=2"),
      "optim.decay_fraction=2.0 must be in [0, 1]")
