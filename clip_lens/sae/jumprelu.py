"""Straight-through gradients for training a JumpReLU SAE's thresholds
(docs/methods.md#sparse-autoencoders).

A JumpReLU latent is `z * H(z - theta)` (H the Heaviside step): its derivative with respect to the
threshold theta is zero almost everywhere, so theta cannot learn from the true gradient. Here the
step's derivative is replaced, in the backward pass only, by a rectangle of width `bandwidth`
centred on the threshold, height 1 / bandwidth (a finite-difference estimate of the jump):

    d/d theta  H(z - theta)       ~  -(1 / bandwidth) * [|z - theta| < bandwidth / 2]
    d/d theta  z * H(z - theta)   ~  -(theta / bandwidth) * [|z - theta| < bandwidth / 2]

The pre-activation z gets the true gradient of `z * H(z - theta)` (H(z - theta)), and none from
the step alone (an L0 penalty moves thresholds, not encoders). The forward values are exact.

    latents = jumprelu(pre, sae.threshold, bandwidth)        # equals sae.activate(pre) for theta >= 0
    l0 = step(pre, sae.threshold, bandwidth).sum(-1).mean()
"""

from __future__ import annotations

import torch
from torch import Tensor


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """1 / bandwidth where pre lies within bandwidth / 2 of the threshold, else 0."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


def _threshold_grad(grad: Tensor, threshold: Tensor) -> Tensor:
    """A gradient [..., n_latents] summed over the leading (batch) dimensions to threshold's shape."""
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(threshold.shape)


class _Step(torch.autograd.Function):
    """H(pre - threshold), with the rectangle pseudo-derivative for the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        threshold_grad = -_window(pre, threshold, ctx.bandwidth) * grad
        return None, _threshold_grad(threshold_grad, threshold), None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold), with the rectangle pseudo-derivative for the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        pre_grad = (pre > threshold).to(grad.dtype) * grad
        threshold_grad = -threshold * _window(pre, threshold, ctx.bandwidth) * grad
        return pre_grad, _threshold_grad(threshold_grad, threshold), None


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """1 where pre exceeds its latent's threshold, else 0 ([..., n_latents]; threshold [n_latents])."""
    return _Step.apply(pre, threshold, bandwidth)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre where it exceeds its latent's threshold, else 0 ([..., n_latents]; threshold [n_latents])."""
    return _JumpReLU.apply(pre, threshold, bandwidth)
