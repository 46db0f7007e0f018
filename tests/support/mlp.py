"""The same-size backprop baseline: an MLP K -> hidden... -> C with ReLU, cross-entropy, Adam (lr 1e-3),
the same data, epochs and batch as the FF runs (optionally the same jitter augmentation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Result, Timer, batches, live_fraction


def shift_images(x, max_shift, gen):
    """Every square image (a row) shifted by its own random (dy, dx) in [-max_shift, max_shift], zeros
    shifted in (written here independently of ff_kernels.data.jitter)."""
    b, k = x.shape
    side = int(round(k ** 0.5))
    out = torch.zeros(b, side + 2 * max_shift, side + 2 * max_shift)
    dy = torch.randint(-max_shift, max_shift + 1, (b,), generator=gen)
    dx = torch.randint(-max_shift, max_shift + 1, (b,), generator=gen)
    imgs = x.view(b, side, side)
    for i in range(b):  # plain and slow on purpose: an oracle, not a kernel
        top, left = max_shift + int(dy[i]), max_shift + int(dx[i])
        out[i, top:top + side, left:left + side] = imgs[i]
    return out[:, max_shift:max_shift + side, max_shift:max_shift + side].reshape(b, k)


def train_mlp(x_tr, y_tr, x_te, y_te, hidden, epochs, batch_size, seed=0, eval_epochs=None,
              num_classes=10, lr=1e-3, jitter=0) -> Result:
    torch.manual_seed(seed)
    sizes = [x_tr.shape[1], *hidden]
    layers = []
    for k, n in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(k, n), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1000)
    timer, history = Timer(), []
    for epoch in range(1, epochs + 1):
        with timer:
            for idx in batches(len(x_tr), batch_size, gen):
                xb = shift_images(x_tr[idx], jitter, gen) if jitter else x_tr[idx]
                opt.zero_grad()
                F.cross_entropy(net(xb), y_tr[idx]).backward()
                opt.step()
        if epoch == epochs or (eval_epochs and epoch in eval_epochs):
            with torch.no_grad():
                acc = float((net(x_te).argmax(1) == y_te).float().mean())
                h, acts = x_te[:1000], []
                for m in net[:-1]:
                    h = m(h)
                    if isinstance(m, nn.ReLU):
                        acts.append(h)
            history.append({"epoch": epoch, "accuracy": {"backprop": acc}, "live": live_fraction(acts)})
    return Result(history[-1]["accuracy"], timer.total / epochs, history[-1]["live"], history)
