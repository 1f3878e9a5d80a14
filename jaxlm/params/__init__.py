"""What the parameters are: per-tensor anatomy, memory and compute preflight, and drift from init.

Parameters are the numbers training moves: weights (kernels of the linear maps), biases (the
shifts added before an activation), embeddings and normalisation scales. Hyperparameters
(layers, widths, learning rate, batch size, temperature, top-k, top-p) are chosen by a person
and fix how many parameters there are and what they cost. `config_report` answers from a config
alone, through `jax.eval_shape`, so nothing is allocated; `run_report` adds, per tensor of a
trained run, its statistics and its drift from the random initialisation.

The modules, in the order a report is built:
  anatomy  one row per tensor (kind, layer, logical axes) and the analytic parameter counts
  cost     bytes per device of params, optimizer state, gradients and activations
  report   `config_report`: the whole preflight of a config
  drift    `run_report`: a trained run's tensors against their random init
  text     both reports as text, and the drift plot
"""

from jaxlm.params.anatomy import (
    FLOPS_CONVENTION,
    KINDS,
    PARAM_FORMULA,
    Tensor,
    count_by,
    count_by_layer,
    formula_block_params,
    formula_param_counts,
    layer_sort_key,
    tensors,
)
from jaxlm.params.cost import GIB, activation_bytes_per_token, shard_elements, state_bytes
from jaxlm.params.drift import drift_report, initial_params, run_report
from jaxlm.params.report import OTHER_HYPERPARAMETERS, SIZE_HYPERPARAMETERS, config_report
from jaxlm.params.text import (
    format_bytes,
    format_config_text,
    format_run_text,
    format_seconds,
    plot_drift,
    plot_lr,
)

__all__ = [
    "FLOPS_CONVENTION", "GIB", "KINDS", "OTHER_HYPERPARAMETERS", "PARAM_FORMULA",
    "SIZE_HYPERPARAMETERS", "Tensor", "activation_bytes_per_token", "config_report", "count_by",
    "count_by_layer", "drift_report", "format_bytes", "format_config_text", "format_run_text",
    "format_seconds", "formula_block_params", "formula_param_counts", "initial_params",
    "layer_sort_key", "plot_drift", "plot_lr", "run_report", "shard_elements", "state_bytes",
    "tensors",
]
