"""Hinton's released Forward-Forward code (the Matlab ffnew script of the 3 x 1000 net), re-derived
in eager PyTorch with its hand-written gradients, in float32.

Per mini-batch, all with the weights from before the batch:
  positive pass  label pixel = 1 (labelstrength); rows RMS-normalised ("ffnormrows": a / (tiny +
                 sqrt(mean a^2))) before every layer; p = logistic((sum h^2 - N) / temp);
                 dC/dz = (1 - p) h, plus the peer term lambdamean (mean(m) - m) on every unit (not
                 gated by the ReLU) where the running mean m = 0.9 m + 0.1 mean_batch(h) (m starts
                 at 0.5); C is goodness, climbed.
  neutral pass   label pixels = 1/10; logits = sum over hidden layers >= 2 of normstates @ sup;
                 the softmax weights step on (targets - softmax) / batch, smoothed:
                 supgrad = 0.9 supgrad + 0.1 grad; sup += gain * 0.1 * (supgrad - 0.003 sup).
  negative pass  a wrong label drawn from softmax(logits - 1000 * targets) (the logits from before
                 the softmax update); dC/dz = -p h.
  update         grad = 0.9 grad + 0.1 (pos + neg) / batch; b += gain * 0.01 * grad_b;
                 W += gain * 0.01 * (grad_W - 0.001 W) (weight cost on weights only).
gain: 1 for epochs e <= E/2 (1-based), then (1 + 2 (E - e)) / E. Weights N(0, 1/fan_in), biases 0.
Prediction: "goodness" = argmax over labels of the summed sum-of-squares of hidden layers >= 2 (the
label pixel at 1); "readout" = the softmax on the neutral pass.
"""

from __future__ import annotations

import math

import torch

from .common import Result, Timer, batches, live_fraction

TINY = math.exp(-50)


def _normrows(a):
    return a / (TINY + a.pow(2).mean(1, keepdim=True).sqrt())


class HintonFF:
    def __init__(self, sizes, num_classes=10, seed=0, epsilon=0.01, epsilonsup=0.1, wc=0.001, supwc=0.003,
                 delay=0.9, lambdamean=0.03, temp=1.0, labelstrength=1.0, min_level=1):
        gen = torch.Generator().manual_seed(seed)
        self.sizes, self.c = list(sizes), num_classes
        self.eps, self.epssup, self.wc, self.supwc = epsilon, epsilonsup, wc, supwc
        self.delay, self.lam, self.temp, self.strength = delay, lambdamean, temp, labelstrength
        # hidden layers are 0-based here; min_level = 1 skips the first (Matlab minlevelsup = 3)
        self.min_level = min_level if len(sizes) > 2 else 0
        self.W = [torch.randn(k, n, generator=gen) / math.sqrt(k) for k, n in zip(sizes[:-1], sizes[1:])]
        self.b = [torch.zeros(n) for n in sizes[1:]]
        self.wgrad = [torch.zeros_like(w) for w in self.W]
        self.bgrad = [torch.zeros_like(b) for b in self.b]
        self.meanstates = [torch.full((n,), 0.5) for n in sizes[1:]]
        self.sup = [torch.zeros(n, num_classes) for n in sizes[1:]]
        self.supgrad = [torch.zeros(n, num_classes) for n in sizes[1:]]
        self.gen = gen

    def _with_label(self, x, label_block):
        data = x.clone()
        data[:, :self.c] = label_block
        return data

    def _states(self, data):
        norm = _normrows(data)
        states, norms = [], [norm]
        for w, b in zip(self.W, self.b):
            s = torch.relu(norm @ w + b)
            norm = _normrows(s)
            states.append(s)
            norms.append(norm)
        return states, norms

    def _logits(self, norms):
        lab = torch.zeros(norms[0].shape[0], self.c)
        for l in range(self.min_level, len(self.W)):
            lab = lab + norms[l + 1] @ self.sup[l]
        return lab

    def train_batch(self, x, y, gain):
        n = x.shape[0]
        targets = torch.nn.functional.one_hot(y, self.c).float()
        # positive pass
        states, norms = self._states(self._with_label(x, self.strength * targets))
        pos_dw, pos_db, posprobs = [], [], []
        for l, s in enumerate(states):
            nl = s.shape[1]
            p = torch.sigmoid((s.pow(2).sum(1) - nl) / self.temp)
            d = (1 - p)[:, None] * s
            self.meanstates[l] = 0.9 * self.meanstates[l] + 0.1 * s.mean(0)
            d = d + self.lam * (self.meanstates[l].mean() - self.meanstates[l])
            pos_dw.append(norms[l].t() @ d)
            pos_db.append(d.sum(0))
            posprobs.append(p)
        # neutral pass and the softmax readout
        neutral = self._with_label(x, torch.full((n, self.c), self.strength / self.c))
        _, nnorms = self._states(neutral)
        labin = self._logits(nnorms)
        labin = labin - labin.max(1, keepdim=True).values
        pred = torch.softmax(labin, 1)
        dlab = targets - pred
        for l in range(self.min_level, len(self.W)):
            g = nnorms[l + 1].t() @ dlab
            self.supgrad[l] = self.delay * self.supgrad[l] + (1 - self.delay) * g / n
            self.sup[l] = self.sup[l] + gain * self.epssup * (self.supgrad[l] - self.supwc * self.sup[l])
        # negative pass with labels drawn from the (pre-update) readout
        probs = torch.softmax(labin - 1000 * targets, 1)
        u = torch.rand(n, 1, generator=self.gen)
        chosen = (u < probs.cumsum(1)).float().argmax(1)
        neg_targets = torch.nn.functional.one_hot(chosen, self.c).float()
        states, norms = self._states(self._with_label(x, self.strength * neg_targets))
        for l, s in enumerate(states):
            nl = s.shape[1]
            p = torch.sigmoid((s.pow(2).sum(1) - nl) / self.temp)
            d = -p[:, None] * s
            dw = pos_dw[l] + norms[l].t() @ d
            db = pos_db[l] + d.sum(0)
            self.wgrad[l] = self.delay * self.wgrad[l] + (1 - self.delay) * dw / n
            self.bgrad[l] = self.delay * self.bgrad[l] + (1 - self.delay) * db / n
            self.b[l] = self.b[l] + gain * self.eps * self.bgrad[l]
            self.W[l] = self.W[l] + gain * self.eps * (self.wgrad[l] - self.wc * self.W[l])

    def predict_goodness(self, x):
        scores = []
        for lab in range(self.c):
            block = torch.zeros(x.shape[0], self.c)
            block[:, lab] = self.strength
            states, _ = self._states(self._with_label(x, block))
            scores.append(sum(s.pow(2).sum(1) for s in states[self.min_level:]))
        return torch.stack(scores, 1).argmax(1)

    def predict_readout(self, x):
        neutral = self._with_label(x, torch.full((x.shape[0], self.c), self.strength / self.c))
        _, norms = self._states(neutral)
        return self._logits(norms).argmax(1)

    def live(self, x, y):
        states, _ = self._states(self._with_label(x, self.strength * torch.nn.functional.one_hot(y, self.c).float()))
        return live_fraction(states)


def gain_schedule(epoch: int, epochs: int) -> float:
    return 1.0 if epoch <= epochs / 2 else (1 + 2 * (epochs - epoch)) / epochs


@torch.no_grad()
def train_hinton(x_tr, y_tr, x_te, y_te, hidden, epochs, batch_size, seed=0, eval_epochs=None,
                 num_classes=10, **kwargs) -> Result:
    torch.manual_seed(seed)
    net = HintonFF([x_tr.shape[1], *hidden], num_classes, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1000)
    timer, history = Timer(), []
    for epoch in range(1, epochs + 1):
        gain = gain_schedule(epoch, epochs)
        with timer:
            for idx in batches(len(x_tr), batch_size, gen):
                net.train_batch(x_tr[idx], y_tr[idx], gain)
        if epoch == epochs or (eval_epochs and epoch in eval_epochs):
            acc = {"goodness": _accuracy(net.predict_goodness, x_te, y_te),
                   "readout": _accuracy(net.predict_readout, x_te, y_te)}
            history.append({"epoch": epoch, "accuracy": acc, "live": net.live(x_te[:1000], y_te[:1000])})
    return Result(history[-1]["accuracy"], timer.total / epochs, history[-1]["live"], history)


def _accuracy(predict, x, y, chunk=2000):
    correct = sum(int((predict(x[i:i + chunk]) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    return correct / len(x)
