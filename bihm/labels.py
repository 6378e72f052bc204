"""The label node y of a BiHM: its draws from p(y) and from q, log p(y), and the checks
of label inputs.

With `n_classes = C > 0` (parameters in `bihm.model.BiHM`) a one-hot label y joins the top
of both nets (symbols of `bihm-math.md`):

    p(y) = softmax(a),   p(h_L | y) with pre-activation b + U y
    q(y | h_{L-1}) = softmax(V h_{L-1} + e)     beside q(h_L | h_{L-1})

so p(x, h, y) = p(y) p(h_L | y) prod_l p(h_l | h_{l+1}) and q(h, y | x) = q(h | x) q(y | h_{L-1}).
In training (semi-supervised) y is observed where the label is known and drawn from q where
it is missing (`draw`), so the estimators estimate log p(x, y) or log p(x). The two
classifiers of a trained label node, q(y | x) and p*(y | x), are `bihm.estimators.classify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from bihm.rng import Generator, uniform

if TYPE_CHECKING:
    from bihm.model import BiHM


@dataclass
class Labels:
    """The label node in one q pass: y one-hot (*, K, C), log q(y | h_{L-1}) for every class
    (*, K, C), and 1 where y was observed rather than drawn from q (*, 1)."""

    onehot: Tensor
    log_q: Tensor
    observed: Tensor

    @property
    def log_q_y(self) -> Tensor:
        """log q(y | h_{L-1}) of the label in use, (*, K)."""
        return (self.onehot * self.log_q).sum(-1)


def check_onehot(model: BiHM, y: Tensor | None) -> Tensor | None:
    """y for log p / log q: one-hot (*, C) with a label node, None without one."""
    if y is None:
        if model.n_classes:
            raise ValueError("y (one-hot labels) is required: the model has a label node")
        return None
    if not model.n_classes:
        raise ValueError("y given, but the model has no label node (n_classes = 0)")
    if y.shape[-1] != model.n_classes:
        raise ValueError(f"y must be one-hot of {model.n_classes} classes, got {tuple(y.shape)}")
    return y


def check_indices(model: BiHM, y: Tensor | None, x: Tensor) -> None:
    """y: class indices of x's leading shape, -1 = missing; only with a label node."""
    if y is None:
        return
    if not model.n_classes:
        raise ValueError("y given, but the model has no label node (n_classes = 0)")
    if y.shape != x.shape[:-1] or y.dtype.is_floating_point:
        raise ValueError(f"y must be integer labels of shape {tuple(x.shape[:-1])}")
    if bool(((y < -1) | (y >= model.n_classes)).any()):
        raise ValueError(f"labels must be in 0..{model.n_classes - 1}, or -1 where missing")


def sample_prior(model: BiHM, n: int, generator: Generator) -> tuple[Tensor, Tensor]:
    """n labels y ~ p(y), one-hot (n, C), and their log p(y): the first draw of the
    ancestral sampling of p (`BiHM._sample_p`)."""
    cdf = torch.softmax(model.label_logits, -1).cumsum(-1).expand(n, -1)
    u = uniform((n, 1), generator, cdf.device, cdf.dtype)
    idx = (cdf < u * cdf[:, -1:]).sum(-1).clamp_(max=model.n_classes - 1)
    y = F.one_hot(idx, model.n_classes).to(cdf.dtype)
    return y, log_p_y(model, y)


def draw(model: BiHM, h_below: Tensor, y: Tensor | None, generator: Generator) -> Labels:
    """y for the label node: observed where y >= 0, else y ~ q(y | h_{L-1}) (drawn for
    every row, so the random streams do not depend on which labels are known).
    h_below (*, K, n_{L-1}); y (*,) class indices, -1 = missing, or None."""
    log_q = torch.log_softmax(model._own(model.q_label(h_below)), -1)  # (*, K, C)
    cdf = log_q.exp().cumsum(-1)
    u = uniform((*cdf.shape[:-1], 1), generator, cdf.device, cdf.dtype)
    drawn = (cdf < u * cdf[..., -1:]).sum(-1).clamp_(max=model.n_classes - 1)
    if y is None:
        observed = torch.zeros(drawn.shape[:-1] + (1,), device=cdf.device, dtype=cdf.dtype)
    else:
        y = y.to(cdf.device)
        observed = (y >= 0).to(cdf.dtype).unsqueeze(-1)  # (*, 1)
        drawn = torch.where(y.unsqueeze(-1) >= 0, y.clamp(min=0).unsqueeze(-1), drawn)
    onehot = F.one_hot(drawn, model.n_classes).to(cdf.dtype)
    return Labels(onehot, log_q, observed)


def log_p_y(model: BiHM, y: Tensor) -> Tensor:
    """log p(y) for one-hot y."""
    return (y * torch.log_softmax(model.label_logits, -1)).sum(-1)
