"""loeweX/Forward-Forward (PyTorch, autograd), re-derived: the whole net's loss is one sum, backward
once, one torch.optim.SGD step.

  input          label pixels one-hot (1.0), neutral 1/10; every layer's input RMS-normalised,
                 z / (sqrt(mean z^2) + 1e-8), the raw input included
  layer          nn.Linear, weights N(0, 1/out_features), biases 0; ReLU whose backward passes the
                 gradient through everywhere (matters only for the peer term)
  FF loss        BCEWithLogits(sum z^2 - N, pos/neg) over the 2B rows, per layer, summed
  peer loss      the running mean r = 0.9 r.detach() + 0.1 mean_pos(z) (starts 0.5), differentiated
                 through this batch's mean; 0.03 * mean_j (mean(r) - r_j)^2 per layer
  classifier     bias-free nn.Linear (zero init) on the normalised neutral-pass activities of the
                 layers above the first (no gradient into the FF layers); cross-entropy
  optimiser      SGD momentum 0.9: FF layers lr 1e-3 wd 3e-4, classifier lr 1e-2 wd 3e-3 (coupled)
  schedule       0-based epoch i > E // 2: lr * 2 (1 + E - i) / E (both groups)
  negatives      a wrong label drawn uniformly among the other classes
Prediction: "readout" = the classifier; "goodness" = argmax over labels of the summed squared
(unnormalised) activities of the layers above the first.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Result, Timer, batches, live_fraction


class ReLUFullGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _layer_norm(z, eps=1e-8):
    return z / (z.pow(2).mean(-1, keepdim=True).sqrt() + eps)


class LoewexFF(nn.Module):
    def __init__(self, sizes, num_classes=10, peer=0.03, rho=0.9):
        super().__init__()
        self.c, self.peer, self.rho = num_classes, peer, rho
        self.layers = nn.ModuleList(nn.Linear(k, n) for k, n in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            nn.init.normal_(layer.weight, 0.0, 1 / math.sqrt(layer.weight.shape[0]))
            nn.init.zeros_(layer.bias)
        self.first = 1 if len(self.layers) > 1 else 0
        self.running = [torch.full((n,), 0.5) for n in sizes[1:]]
        self.classifier = nn.Linear(sum(sizes[1 + self.first:]), num_classes, bias=False)
        nn.init.zeros_(self.classifier.weight)

    def _embed(self, x, block):
        x = x.clone()
        x[:, :self.c] = block
        return x

    def loss(self, x, y, gen):
        b = x.shape[0]
        onehot = F.one_hot(y, self.c).float()
        shift = torch.randint(1, self.c, (b,), generator=gen)
        wrong = F.one_hot((y + shift) % self.c, self.c).float()
        z = torch.cat([self._embed(x, onehot), self._embed(x, wrong)])
        target = torch.cat([torch.ones(b), torch.zeros(b)])
        z = _layer_norm(z)
        total = 0.0
        for i, layer in enumerate(self.layers):
            z = ReLUFullGrad.apply(layer(z))
            if self.peer > 0:
                r = self.running[i].detach() * self.rho + z[:b].mean(0) * (1 - self.rho)
                self.running[i] = r
                total = total + self.peer * (r.mean() - r).pow(2).mean()
            total = total + F.binary_cross_entropy_with_logits(z.pow(2).sum(1) - z.shape[1], target)
            z = _layer_norm(z.detach())
        feats = self.features(self._embed(x, torch.full((b, self.c), 1.0 / self.c)))
        total = total + F.cross_entropy(self.classifier(feats), y)
        return total

    @torch.no_grad()
    def features(self, x):
        z, out = _layer_norm(x), []
        for i, layer in enumerate(self.layers):
            z = _layer_norm(torch.relu(layer(z)))
            if i >= self.first:
                out.append(z)
        return torch.cat(out, 1)

    @torch.no_grad()
    def predict_readout(self, x):
        return self.classifier(self.features(self._embed(x, torch.full((x.shape[0], self.c), 1.0 / self.c)))).argmax(1)

    @torch.no_grad()
    def activities(self, x):
        z, out = _layer_norm(x), []
        for layer in self.layers:
            h = torch.relu(layer(z))
            out.append(h)
            z = _layer_norm(h)
        return out

    @torch.no_grad()
    def predict_goodness(self, x):
        scores = []
        for lab in range(self.c):
            acts = self.activities(self._embed(x, F.one_hot(torch.full((x.shape[0],), lab), self.c).float()))
            scores.append(sum(h.pow(2).sum(1) for h in acts[self.first:]))
        return torch.stack(scores, 1).argmax(1)


def cooldown(lr, epoch0, epochs):
    return lr * 2 * (1 + epochs - epoch0) / epochs if epoch0 > epochs // 2 else lr


def train_loewex(x_tr, y_tr, x_te, y_te, hidden, epochs, batch_size, seed=0, eval_epochs=None,
                 num_classes=10, lr=1e-3, weight_decay=3e-4, momentum=0.9, classifier_lr=1e-2,
                 classifier_weight_decay=3e-3, drop_last=False) -> Result:
    torch.manual_seed(seed)
    net = LoewexFF([x_tr.shape[1], *hidden], num_classes)
    main = [p for p in net.layers.parameters()]
    opt = torch.optim.SGD([
        {"params": main, "lr": lr, "weight_decay": weight_decay, "momentum": momentum},
        {"params": net.classifier.parameters(), "lr": classifier_lr, "weight_decay": classifier_weight_decay,
         "momentum": momentum}])
    gen = torch.Generator().manual_seed(seed + 1000)
    timer, history = Timer(), []
    for epoch0 in range(epochs):
        opt.param_groups[0]["lr"] = cooldown(lr, epoch0, epochs)
        opt.param_groups[1]["lr"] = cooldown(classifier_lr, epoch0, epochs)
        with timer:
            for idx in batches(len(x_tr), batch_size, gen, drop_last):
                opt.zero_grad()
                net.loss(x_tr[idx], y_tr[idx], gen).backward()
                opt.step()
        epoch = epoch0 + 1
        if epoch == epochs or (eval_epochs and epoch in eval_epochs):
            acc = {"goodness": _accuracy(net.predict_goodness, x_te, y_te),
                   "readout": _accuracy(net.predict_readout, x_te, y_te)}
            acts = net.activities(net._embed(x_te[:1000], F.one_hot(y_te[:1000], num_classes).float()))
            history.append({"epoch": epoch, "accuracy": acc, "live": live_fraction(acts)})
    return Result(history[-1]["accuracy"], timer.total / epochs, history[-1]["live"], history)


def _accuracy(predict, x, y, chunk=2000):
    correct = sum(int((predict(x[i:i + chunk]) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    return correct / len(x)
