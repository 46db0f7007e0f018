"""The popular PyTorch recipe (mohammadpz/pytorch_forward_forward, main.py), re-derived in eager
PyTorch and translated from its full batch (1000 steps per layer, one layer after another) to
mini-batches (every layer steps on every batch, bottom up, each on the previous layer's detached
output of the same forward).

  layer      nn.Linear (default init) with its own Adam(lr 0.03); forward normalises its input,
             x / (|x|_2 + 1e-4), then relu(x W^T + b) (so the raw input is l2-normalised too)
  goodness   mean of h^2; loss mean(log(1 + exp([2 - g_pos, g_neg - 2]))) (softplus, overflow-safe)
  labels     the first 10 features zeroed and the label's set to the batch's maximum value;
             negatives carry the labels of a random permutation of the batch (some are right)
  predict    argmax over labels of the summed mean goodness of every layer
``standardize``: the source normalises images by MNIST's mean/std (0.1307, 0.3081) first (off by
default: every implementation here gets the same [0, 1] images). ``negatives="uniform"``: a wrong
label drawn among the other classes instead of the source's permutation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Result, Timer, batches, live_fraction


def overlay(x, y, c):
    x = x.clone()
    x[:, :c] = 0.0
    x[torch.arange(x.shape[0]), y] = x.max()
    return x


class RecipeLayer(nn.Linear):
    def __init__(self, k, n, lr=0.03, threshold=2.0):
        super().__init__(k, n)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)
        self.threshold = threshold

    def forward(self, x):
        return torch.relu(F.linear(x / (x.norm(2, 1, keepdim=True) + 1e-4), self.weight, self.bias))

    def train_batch(self, x_pos, x_neg):
        h_pos, h_neg = self(x_pos), self(x_neg)
        g_pos, g_neg = h_pos.pow(2).mean(1), h_neg.pow(2).mean(1)
        loss = F.softplus(torch.cat([self.threshold - g_pos, g_neg - self.threshold])).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return h_pos.detach(), h_neg.detach()


class RecipeFF:
    def __init__(self, sizes, num_classes=10, lr=0.03, threshold=2.0):
        self.c = num_classes
        self.layers = [RecipeLayer(k, n, lr, threshold) for k, n in zip(sizes[:-1], sizes[1:])]

    def train_batch(self, x, y, gen, negatives="permutation"):
        if negatives == "permutation":  # the source: some negatives carry their true label
            wrong = y[torch.randperm(x.shape[0], generator=gen)]
        else:  # a wrong label drawn uniformly among the others
            wrong = (y + torch.randint(1, self.c, y.shape, generator=gen)) % self.c
        h_pos, h_neg = overlay(x, y, self.c), overlay(x, wrong, self.c)
        for layer in self.layers:
            h_pos, h_neg = layer.train_batch(h_pos, h_neg)

    @torch.no_grad()
    def activities(self, h):
        out = []
        for layer in self.layers:
            h = layer(h)
            out.append(h)
        return out

    @torch.no_grad()
    def predict_goodness(self, x):
        scores = [sum(h.pow(2).mean(1) for h in self.activities(overlay(x, torch.full((x.shape[0],), lab), self.c)))
                  for lab in range(self.c)]
        return torch.stack(scores, 1).argmax(1)


def train_recipe(x_tr, y_tr, x_te, y_te, hidden, epochs, batch_size, seed=0, eval_epochs=None,
                 num_classes=10, standardize=False, lr=0.03, negatives="permutation") -> Result:
    torch.manual_seed(seed)
    if standardize:
        x_tr, x_te = (x_tr - 0.1307) / 0.3081, (x_te - 0.1307) / 0.3081
    net = RecipeFF([x_tr.shape[1], *hidden], num_classes, lr)
    gen = torch.Generator().manual_seed(seed + 1000)
    timer, history = Timer(), []
    for epoch in range(1, epochs + 1):
        with timer:
            for idx in batches(len(x_tr), batch_size, gen):
                net.train_batch(x_tr[idx], y_tr[idx], gen, negatives)
        if epoch == epochs or (eval_epochs and epoch in eval_epochs):
            acc = {"goodness": _accuracy(net.predict_goodness, x_te, y_te)}
            live = live_fraction(net.activities(overlay(x_te[:1000], y_te[:1000], num_classes)))
            history.append({"epoch": epoch, "accuracy": acc, "live": live})
    return Result(history[-1]["accuracy"], timer.total / epochs, history[-1]["live"], history)


def _accuracy(predict, x, y, chunk=2000):
    correct = sum(int((predict(x[i:i + chunk]) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    return correct / len(x)
