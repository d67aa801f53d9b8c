"""The op tables of block discovery: which modules, functions and tensor methods produce units,
fold into a producer, pass channels through, act as activations or gates, or end a block
(residual additions, concatenations, attention, reshapes), and which only read metadata."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import CompactAttention, CompactMultiheadAttention

PRODUCERS = (nn.Linear, nn.Conv2d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
#: modules that are the identity at inference
IDENTITIES = DROPOUTS + (nn.Identity,)
#: channel-wise ops that commute with ReLU (monotone, per channel): allowed before it too
PRE_RELU_MODULES = DROPOUTS + (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity)
PRE_RELU_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.max_pool2d, F.adaptive_max_pool2d}
#: channel-wise, positively homogeneous modules allowed between ReLU and the consumer
PASS_MODULES = PRE_RELU_MODULES + (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ReLU)
PASS_FUNCTIONS = PRE_RELU_FUNCTIONS | {
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.relu,
    torch.relu,
    torch.relu_,
    torch.flatten,
}
PASS_METHODS = {"relu", "relu_", "flatten", "contiguous"}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
ACTIVATIONS = (
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.SELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Mish,
    nn.ReLU6,
    nn.CELU,
    nn.GLU,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.RReLU,
    nn.Softmax,
    nn.LogSoftmax,
)
ACTIVATION_FUNCTIONS = {
    F.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.hardswish,
    F.mish,
    F.relu6,
    F.selu,
    F.glu,
    F.tanh,
    F.sigmoid,
    F.hardtanh,
    F.hardsigmoid,
    F.celu,
    F.prelu,
    F.rrelu,
    F.logsigmoid,
    F.softsign,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.exp,
    torch.abs,
}
ACTIVATION_METHODS = {"sigmoid", "tanh", "exp", "abs", "softmax", "sigmoid_", "tanh_", "abs_"}
#: activations accepted besides ReLU: blocks with them are compressed by the same methods;
#: only ReLU, LeakyReLU and ReLU6 (piecewise linear) have a certificate
ACCEPTED_MODULES = {nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
ACCEPTED_FUNCTIONS = {F.relu6: "relu6", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish"}
#: element-wise gates a channel group may pass (squeeze-and-excitation scales): never a
#: block's activation, no certificate
GATE_MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
GATE_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid"}
RESIDUAL_OPS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
CONCAT_OPS = {torch.cat, torch.concat, torch.stack}
#: products of two activations or attention: not a fixed linear read of the units
ATTENTION_OPS = {
    operator.mul,
    operator.imul,
    torch.mul,
    operator.matmul,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
    torch.baddbmm,
}
ATTENTION_METHODS = {"mul", "mul_", "matmul", "bmm"}
#: the attention layers compress writes: traced as leaves, like torch.nn's (tracing.trace)
COMPACT_MODULES = (CompactAttention, CompactMultiheadAttention)
ATTENTION_MODULES = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.Transformer,
    *COMPACT_MODULES,
)
#: ops that move values between channels (or between samples and channels)
RESHAPE_FUNCTIONS = {
    torch.reshape,
    torch.flatten,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.movedim,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.channel_shuffle,
    torch.roll,
    torch.flip,
    torch.t,
}
RESHAPE_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "t",
    "chunk",
    "split",
    "swapaxes",
    "movedim",
    "roll",
    "flip",
    "view_as",
    "reshape_as",
    "expand",
    "repeat",
    "unfold",
}
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
#: tensor methods and attributes that read shape or type only (not a use of the values)
METADATA_METHODS = {"size", "dim", "numel", "type", "get_device", "is_contiguous"}
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
SPATIAL_DIMS = ({2, 3}, {-1, -2})


#: products of two tensors: a gate (squeeze-and-excitation) when they meet in a channel group
MUL_OPS = {operator.mul, operator.imul, torch.mul}
