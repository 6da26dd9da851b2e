"""A straightforward, unfused K-FAC in the style of the paper's reference code: the benchmark baseline
(``from kldwrm_fast.baselines import ReferenceKFAC``), and an independent oracle for the tests.

Same function as :class:`kldwrm_fast.KFAC` (docs/algorithms.md §3: EA from the first statistics, bias folded
in, damped eigen-preconditioning, KL clipping, ``buf ← μ buf + d``, ``W̄ ← W̄ − lr(1−μ) buf``), written the way the
reference implementations are: module hooks that save inputs and output gradients, factors, EAs,
``torch.linalg.eigh`` and preconditioning one layer at a time, and the KL-clip sum read back to the host
with one ``.item()`` per layer. Statistics come from the training loss's backward (empirical Fisher); a
sampled Fisher is obtained as in the reference code by an extra backward pass in the training loop
(:meth:`ReferenceKFAC.sampled_statistics_backward`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceKFAC(torch.optim.Optimizer):
    def __init__(self, model, lr=0.01, rho=0.95, damping=0.01, momentum=0.9, kl_clip=0.1, weight_decay=0.0,
                 stat_freq=30, inv_freq=30):  # fmt: skip
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        super().__init__(model.parameters(), dict(lr=lr))
        self.rho, self.damping, self.momentum, self.kl_clip = rho, damping, momentum, kl_clip
        self.weight_decay, self.stat_freq, self.inv_freq = weight_decay, stat_freq, inv_freq
        self.steps = 0
        self.saved = {}
        for layer in self.layers:
            layer.register_forward_pre_hook(self._save_input)
            layer.register_full_backward_hook(self._save_grad)

    def _due(self):
        return self.steps % self.stat_freq == 0

    def _save_input(self, module, inputs):
        if torch.is_grad_enabled() and module.training and self._due():
            self.saved[(module, "a")] = inputs[0].detach()

    def _save_grad(self, module, grad_input, grad_output):
        if module.training and self._due():
            self.saved[(module, "g")] = grad_output[0].detach()

    def sampled_statistics_backward(self, output):
        """The reference code's sampled Fisher: backward of a loss on sampled labels, then zero the grads."""
        if not self._due():
            return
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(output.detach(), 1), 1).squeeze(1)
        F.cross_entropy(output, labels).backward(retain_graph=True)
        self.zero_grad()

    def _factors(self, layer):
        a, g = self.saved[(layer, "a")], self.saved[(layer, "g")]
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(
                a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
            )
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            m = g.shape[0]
            g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        else:
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            m = g.shape[0]
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a.t() @ a / a.shape[0], (g.t() @ g) * m

    @torch.no_grad()
    def step(self):
        lr = self.param_groups[0]["lr"]
        directions, total = [], 0.0
        for layer in self.layers:
            state = self.state[layer.weight]
            if self._due():
                aa, gg = self._factors(layer)
                if "aa" not in state:
                    state["aa"], state["gg"] = aa.clone(), gg.clone()
                state["aa"].mul_(self.rho).add_(aa, alpha=1 - self.rho)
                state["gg"].mul_(self.rho).add_(gg, alpha=1 - self.rho)
            if self.steps % self.inv_freq == 0:
                da, qa = torch.linalg.eigh(state["aa"])
                dg, qg = torch.linalg.eigh(state["gg"])
                state["eig"] = (qa, da.clamp_min(0), qg, dg.clamp_min(0))
            weight = layer.weight.reshape(layer.weight.shape[0], -1)
            grad = layer.weight.grad.reshape(weight.shape)
            if layer.bias is not None:
                weight = torch.cat([weight, layer.bias[:, None]], 1)
                grad = torch.cat([grad, layer.bias.grad[:, None]], 1)
            v = grad + self.weight_decay * weight
            qa, da, qg, dg = state["eig"]
            d = qg @ ((qg.t() @ v @ qa) / (dg[:, None] * da[None, :] + self.damping)) @ qa.t()
            total += (d * v).sum().item() * lr * lr
            directions.append(d)
        nu = min(1.0, math.sqrt(self.kl_clip / total)) if total > 0 else 1.0
        for layer, d in zip(self.layers, directions):
            state = self.state[layer.weight]
            buf = state.setdefault("buf", torch.zeros_like(d))
            buf.mul_(self.momentum).add_(d, alpha=nu)
            update = buf * (-lr * (1 - self.momentum))
            n_weight = layer.weight[0].numel()
            layer.weight.add_(update[:, :n_weight].reshape(layer.weight.shape))
            if layer.bias is not None:
                layer.bias.add_(update[:, n_weight])
        self.saved.clear()
        self.steps += 1
