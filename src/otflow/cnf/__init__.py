"""The CNF layer: continuous normalizing flows on top of the ODE layer.

Velocity fields and native modules (:mod:`.fields`), divergence estimators (:mod:`.divergence`),
the augmented dynamics of FFJORD and RNODE (:mod:`.dynamics`), the RNODE
objective with bits/dim and the logit transform (:mod:`.objective`), the
:class:`Flow` (:mod:`.flow`) and its file format (:mod:`.serialize`). Imports the
ODE layer and the base layer only. The backend is a keyword argument (``backend=``) or
inferred from the arrays, never a leading positional one (:mod:`.signature`).
"""
from .conv_field import ConvField
from .divergence import (DivergenceEstimate, estimate_divergence, exact_divergence, hutchinson_divergence,
                         hutchplusplus_divergence, probe_vjp)
from .dynamics import DENSITY_NORM, RNODE_NORM, density_rhs, flow_rhs, rnode_rhs, standard_normal_logpdf
from .fields import (ACTIVATIONS, CONDITIONINGS, MLP, FunctionField, VelocityField, module_event_shape, native_field,
                     register_native_field)
from .flow import OUTPUTS, Flow, SolverOptions, load
from .image import (LOGIT_ALPHA, bin_midpoints, dequantized_bits_per_dim, logit_inverse, logit_preprocess,
                    midpoint_bits_per_dim)
from .multiscale import (FACTOR_OUT, SQUEEZE, MultiscaleSpec, ScaleShapes, factored_log_density, merge_channels,
                         multiscale_inverse, multiscale_log_prob, multiscale_transform, split_channels, squeeze,
                         unsqueeze)
from .multiscale_flow import BitsPerDim, MultiscaleFlow
from .multiscale_objective import multiscale_rnode_loss
from .objective import RNODELoss, bits_per_dim, dequantize, logit_transform, rnode_loss
from .serialize import ModelFileError

__all__ = [
    "DivergenceEstimate", "estimate_divergence", "exact_divergence", "hutchinson_divergence",
    "hutchplusplus_divergence", "probe_vjp",
    "DENSITY_NORM", "RNODE_NORM", "density_rhs", "flow_rhs", "rnode_rhs", "standard_normal_logpdf",
    "ACTIVATIONS", "CONDITIONINGS", "MLP", "FunctionField", "VelocityField", "module_event_shape",
    "native_field", "register_native_field",
    "Flow", "SolverOptions", "load", "OUTPUTS",
    "RNODELoss", "bits_per_dim", "dequantize", "logit_transform", "rnode_loss",
    "ModelFileError",
    "ConvField",
    "LOGIT_ALPHA", "bin_midpoints", "dequantized_bits_per_dim", "logit_inverse", "logit_preprocess",
    "midpoint_bits_per_dim",
    "FACTOR_OUT", "SQUEEZE", "MultiscaleSpec", "ScaleShapes", "factored_log_density", "merge_channels",
    "multiscale_inverse", "multiscale_log_prob", "multiscale_transform", "split_channels", "squeeze", "unsqueeze",
    "BitsPerDim", "MultiscaleFlow",
    "multiscale_rnode_loss",
]
