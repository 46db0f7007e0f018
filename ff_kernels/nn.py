"""Modules on top of the ops: one FF layer (FFLinear), a linear softmax readout (FFReadout) and a stack
trained layer by layer (FFNet), with the presets of DESIGN.md section 1.

All training state lives in the modules, so ``state_dict()`` round-trips it and ``.to()`` moves it:
momentum buffers and peer-normalisation running means are registered buffers, the readout is a
submodule, and the state of optimisers the net owns (Adam, ...) and the learning-rate schedule's
position travel through ``get_extra_state``. Momentum buffers are created by the first momentum step
(PyTorch's SGD sets buf = grad on its first step; Hinton's smoothing starts from zero) and are
recreated by ``load_state_dict`` when the state dict holds them.

No training step reads a value back to the host (no ``.item()``/``.tolist()``): per-epoch reporting
does that once an epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .config import FFConfig
from .data import (embed_all_labels, embed_labels, embed_neutral_label, hybrid_images,
                   jitter as jitter_images, wrong_labels, wrong_labels_from_scores)
from .ops import ff_layer_forward, ff_layer_step, sgd_update_

_MOMENTUM_BUFFERS = ("momentum_weight", "momentum_bias")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _momentum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The op's choice: the parameter's dtype, float32 for half-precision parameters."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_real(name: str, value, low: float = 0.0, high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return float(value)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def normalize_rows(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A network's input normalisation of raw rows (DESIGN section 1): x / (|x| + eps) for "l2",
    x / (|x| / sqrt(K) + eps) for "rms" (every row then has a mean square of about 1), x for "none".
    The same formulas the layers apply to their outputs."""
    if norm == "none":
        return x
    row_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=_accumulation_dtype(x.dtype))
    if norm == "rms":
        row_norm = row_norm / math.sqrt(x.shape[1])
    elif norm != "l2":
        raise ValueError(f"norm must be 'l2', 'rms' or 'none', got {norm!r}")
    return (x / (row_norm + eps)).to(x.dtype)


class _TrainingState(nn.Module):
    """Lazily created momentum buffers that state_dict round-trips and .to()/.half()/.double() move,
    kept in float32 for half-precision parameters, as the op creates them."""

    def _init_momentum(self) -> None:
        for name in _MOMENTUM_BUFFERS:
            self.register_buffer(name, None)

    @property
    def momentum_buffers(self):
        """(buf_weight, buf_bias), or None before the first momentum step."""
        if self.momentum_weight is None:
            return None
        return self.momentum_weight, self.momentum_bias

    def reset_momentum(self) -> None:
        """Forget the momentum: the next momentum step starts afresh."""
        self.momentum_weight = self.momentum_bias = None

    def _state_buffer_spec(self, name: str):
        """(shape, dtype) a state buffer must have for the current parameters, or None."""
        param = self.weight if name == "momentum_weight" else self.bias
        if name in _MOMENTUM_BUFFERS:
            return None if param is None else (tuple(param.shape), _momentum_dtype(param.dtype))
        return None

    def _apply(self, fn, recurse=True):
        # .half() would round float32 state to float16 and back: convert from the saved originals.
        saved = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            spec = self._state_buffer_spec(name)
            new = self._buffers[name]
            if spec is not None and new is not None and new.dtype != spec[1]:
                self._buffers[name] = old.to(device=new.device, dtype=spec[1])
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in _MOMENTUM_BUFFERS:
            spec = self._state_buffer_spec(name)
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is None and spec is not None:
                self._buffers[name] = torch.empty(spec[0], dtype=spec[1], device=self.weight.device)
            elif key not in state_dict and self._buffers.get(name) is not None:
                self._buffers[name] = None  # the saved module had not started its momentum
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class FFLinear(_TrainingState):
    """One Forward-Forward layer: relu(x W^T + b), normalised per ``config.norm``, with its goodness.

    ``forward(x)`` returns the normalised output only, so layers compose in ``nn.Sequential``;
    ``goodness(x)`` gives the goodness [B], ``forward_with_goodness(x)`` both in one pass.
    Training state (registered buffers): ``momentum_weight``/``momentum_bias`` (created by the first
    momentum step) and, with ``config.peer_norm`` != "none", ``peer_mean`` [N], the running mean of
    the positive activities (starts at 0.5; float32, float64 for float64 weights).
    """

    def __init__(self, in_features: int, out_features: int, config: Optional[FFConfig] = None,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if config is not None and not isinstance(config, FFConfig):
            raise TypeError(f"config must be an ff_kernels.FFConfig, got {type(config).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.config = config if config is not None else FFConfig()
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._init_momentum()
        peer = None
        if self.config.peer_norm != "none":
            peer = torch.full((out_features,), 0.5, device=self.weight.device,
                              dtype=_accumulation_dtype(self.weight.dtype))
        self.register_buffer("peer_mean", peer)
        self.reset_parameters()

    def reset_parameters(self, init: str = "linear") -> None:
        """Initialise the weights. "linear": nn.Linear's (so FF and backprop baselines start alike);
        "normal_fan_in": N(0, 1/K), bias 0 (Hinton's code); "normal_fan_out": N(0, 1/N), bias 0
        (loeweX/Forward-Forward)."""
        with torch.no_grad():
            if init == "linear":
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(self.in_features)
                    nn.init.uniform_(self.bias, -bound, bound)
            elif init in ("normal_fan_in", "normal_fan_out"):
                fan = self.in_features if init == "normal_fan_in" else self.out_features
                nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(fan))
                if self.bias is not None:
                    nn.init.zeros_(self.bias)
            else:
                raise ValueError(f"init must be 'linear', 'normal_fan_in' or 'normal_fan_out', got {init!r}")

    def _state_buffer_spec(self, name):
        if name == "peer_mean":
            return (self.out_features,), _accumulation_dtype(self.weight.dtype)
        return super()._state_buffer_spec(name)

    def train_step(self, x_pos, x_neg, lr: Optional[float] = None, momentum: float = 0.0,
                   weight_decay: float = 0.0, optimizer: Optional[torch.optim.Optimizer] = None, *,
                   dampening: float = 0.0, decoupled_weight_decay: bool = False,
                   skip_nonfinite: bool = False):
        """One local step on positives ``x_pos`` and negatives ``x_neg`` (already normalised rows).

        With ``lr``: the fused SGD step in place, PyTorch's convention (momentum, dampening, coupled
        weight decay; the first momentum step sets buf = grad) or, with
        ``decoupled_weight_decay=True``, Hinton's (buf = mu buf + (1 - dampening) grad from zero;
        p -= lr (buf + weight_decay p)). With ``optimizer`` (over this layer's parameters): the
        gradients land in ``.grad`` and the optimizer steps. With neither: gradients are returned
        only. The peer running mean, if any, is updated in every mode. ``skip_nonfinite``: a step
        whose inputs or results hold NaN/inf changes nothing (fused SGD and peer mean; decided on the
        device, ``out.nonfinite`` says so). Returns the op's FFStepOutput.
        """
        if optimizer is not None and lr is not None:
            raise ValueError("give either lr (fused SGD) or optimizer, not both")
        bias = self.bias.data if self.bias is not None else None
        if lr is None:
            out = ff_layer_step(x_pos, x_neg, self.weight.data, bias, self.config, momentum=momentum,
                                weight_decay=weight_decay, dampening=dampening,
                                decoupled_weight_decay=decoupled_weight_decay,
                                backend=self.backend, peer_mean=self.peer_mean,
                                skip_nonfinite=skip_nonfinite)
            if optimizer is not None:
                self.weight.grad = out.grad_weight
                if self.bias is not None:
                    self.bias.grad = out.grad_bias
                optimizer.step()
            return out
        out = ff_layer_step(x_pos, x_neg, self.weight.data, bias, self.config, lr=lr, momentum=momentum,
                            weight_decay=weight_decay,
                            momentum_buffers=self.momentum_buffers if momentum else None,
                            backend=self.backend, dampening=dampening,
                            decoupled_weight_decay=decoupled_weight_decay, peer_mean=self.peer_mean,
                            skip_nonfinite=skip_nonfinite)
        if momentum and self.momentum_weight is None:
            self.momentum_weight, self.momentum_bias = out.momentum_buffers
        return out

    def forward_with_goodness(self, x):
        """(normalised output y [B, N], goodness g [B]) in one pass; no update, no autograd."""
        bias = self.bias.data if self.bias is not None else None
        return ff_layer_forward(x, self.weight.data, bias, self.config, backend=self.backend)

    def forward(self, x):
        """The normalised output y [B, N] (the next layer's input)."""
        return self.forward_with_goodness(x)[0]

    def goodness(self, x):
        """The goodness g [B] of rows x (float32, float64 for float64 weights)."""
        return self.forward_with_goodness(x)[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, config={self.config}"


class FFReadout(_TrainingState):
    """A linear softmax readout over FF features, trained without autograd by the same SGD rule as
    the fused step (PyTorch's convention, or Hinton's with ``decoupled_weight_decay=True``).

    The defaults are Hinton's readout: lr 0.1, gradient smoothing 0.9 (momentum 0.9, dampening 0.9),
    decoupled weight cost 0.003, no bias.
    ``forward(features)`` gives logits [B, C]; ``train_step(features, labels)`` takes one step on the
    cross-entropy (mean over the batch) and returns the logits computed *before* the update (what
    Hinton's code draws hard negatives from) and the loss. Weights start at zero.
    """

    def __init__(self, in_features: int, num_classes: int, lr: float = 0.1, momentum: float = 0.9,
                 dampening: float = 0.9, weight_decay: float = 0.003, decoupled_weight_decay: bool = True,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.lr = _check_real("readout lr", lr)
        self.momentum = _check_real("readout momentum", momentum)
        self.dampening = _check_real("readout dampening", dampening, 0.0, 1.0)
        self.weight_decay = _check_real("readout weight_decay", weight_decay)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype)) if bias else None
        self._init_momentum()

    def forward(self, features):
        return nn.functional.linear(features, self.weight, self.bias)

    @torch.no_grad()
    def train_step(self, features, labels, lr_gain: float = 1.0):
        logits, loss, grads = self.gradients(features, labels)
        self.apply_gradients(grads, lr_gain)
        return logits, loss

    @torch.no_grad()
    def gradients(self, features, labels):
        """(logits [B, C], loss, [grad_weight, grad_bias?]) of the mean cross-entropy, in float32
        (float64 for float64 weights), before any update: what data-parallel ranks all-reduce."""
        acc = _accumulation_dtype(self.weight.dtype)
        f = features.to(acc)
        w = self.weight.data.to(acc)
        logits = f @ w.t()
        if self.bias is not None:
            logits = logits + self.bias.data.to(acc)
        log_p = torch.log_softmax(logits, dim=1)
        loss = -log_p.gather(1, labels[:, None]).mean()
        grad_logits = log_p.exp()
        grad_logits.scatter_add_(1, labels[:, None], torch.full_like(grad_logits[:, :1], -1.0))
        grad_logits /= f.shape[0]
        grads = [grad_logits.t() @ f]
        if self.bias is not None:
            grads.append(grad_logits.sum(0))
        return logits, loss, grads

    @torch.no_grad()
    def apply_gradients(self, grads, lr_gain: float = 1.0) -> None:
        """The readout's SGD rule (momentum, dampening, weight decay) for ``gradients``' list."""
        params = [self.weight, self.bias] if self.bias is not None else [self.weight]
        names = _MOMENTUM_BUFFERS[:len(params)]
        for p, g, name in zip(params, grads, names):
            buf = sgd_update_(p.data, g.to(p.dtype), self._buffers.get(name) if self.momentum else None,
                              lr=self.lr * lr_gain, momentum=self.momentum, dampening=self.dampening,
                              weight_decay=self.weight_decay,
                              decoupled_weight_decay=self.decoupled_weight_decay)
            if self.momentum and self._buffers.get(name) is None:
                self._buffers[name] = buf

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, lr={self.lr}, "
                f"momentum={self.momentum}, dampening={self.dampening}, weight_decay={self.weight_decay}, "
                f"decoupled_weight_decay={self.decoupled_weight_decay}, bias={self.bias is not None}")


OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]
LR_SCHEDULES = ("constant", "hinton", "loewex")
NEGATIVES = ("uniform", "hard")
PREDICT = ("goodness", "readout")


def lr_gain(schedule: str, epoch: int, epochs: Optional[int]) -> float:
    """The learning-rate multiplier of epoch ``epoch`` (1-based) of ``epochs``.

    "hinton" (his code): 1 for e <= E/2, then (1 + 2 (E - e)) / E, falling linearly to 1/E.
    "loewex" (loeweX/Forward-Forward, its 0-based epoch i = e - 1): 1 for i <= E // 2, then
    2 (1 + E - i) / E. "constant": 1."""
    if schedule == "constant" or epoch <= 0:
        return 1.0
    if schedule == "hinton":
        return 1.0 if epoch <= epochs / 2 else (1 + 2 * (epochs - epoch)) / epochs
    i = epoch - 1
    return 1.0 if i <= epochs // 2 else 2 * (1 + epochs - i) / epochs


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def epoch_loop(net: "FFNet", x, batch_size: int, generator, drop_last: bool, step) -> dict:
    """The loop every epoch shares (supervised, unsupervised, data parallel): a shuffled order of
    x's rows drawn on the generator's device, ``step(idx)`` -> FFTrainOutput per batch of indices,
    and the epoch's statistics kept as device tensors (no host sync): per-layer mean loss (None
    when no layer trained), per-layer count of non-finite steps, mean readout loss or None."""
    n = x.shape[0]
    dev = generator.device if generator is not None else x.device
    order = torch.randperm(n, generator=generator, device=dev).to(x.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    losses, readout_losses, nonfinite = [], [], []
    for i in range(0, stop, batch_size):
        out = step(order[i:i + batch_size])
        if out.layers:
            losses.append(torch.stack([o.loss for o in out.layers]))
            nonfinite.append(torch.stack([o.nonfinite for o in out.layers]))
        if out.readout_loss is not None:
            readout_losses.append(out.readout_loss)
    zeros = torch.zeros(len(net.layers), dtype=torch.long, device=x.device)
    return {"loss": torch.stack(losses).mean(0) if losses else None,
            "nonfinite_steps": torch.stack(nonfinite).sum(0) if nonfinite else zeros,
            "readout_loss": torch.stack(readout_losses).mean() if readout_losses else None}


def labelled_epoch(net: "FFNet", train_labels, all_label_scores, x, labels, batch_size: int, generator,
                   jitter: int, drop_last: bool, score_batch: int) -> dict:
    """``FFNet.train_epoch`` with its two steps given: ``train_labels(xb, yb, generator,
    negative_labels=...)`` and ``all_label_scores(x, score_batch)`` (one process's, or a data-parallel
    wrapper's that shards the work)."""
    _check_batch_size(batch_size)
    net._check_batch(x=x)
    net.start_epoch()
    scores = None
    if net.negatives == "hard" and net.readout is None:
        scores = all_label_scores(x, score_batch)

    def step(idx):
        xb, yb = x[idx], labels[idx]
        neg = None if scores is None else wrong_labels_from_scores(scores[idx], yb, generator)
        if jitter:
            xb = jitter_images(xb, jitter, generator=generator)
        return train_labels(xb, yb, generator, negative_labels=neg)

    return epoch_loop(net, x, batch_size, generator, drop_last, step)


@dataclass
class FFTrainOutput:
    """What ``FFNet.train_labels`` returns: the per-layer step outputs, the readout's loss before its
    update (None without a readout) and the wrong labels the negatives carried."""

    layers: list
    readout_loss: Optional[torch.Tensor]
    negative_labels: torch.Tensor


class FFNet(nn.Module):
    """A stack of FF layers; each trains on the previous layer's normalised, detached output.

    The raw input rows (labels embedded) are normalised before the first layer per
    ``input_norm`` ("auto": the first layer's ``config.norm``), in training, prediction and the
    readout alike.

    optimizer: "sgd" (the fused in-place update: lr, momentum, weight_decay, dampening,
    decoupled_weight_decay), "adam" (torch.optim.Adam per layer through the gradient mode), or a
    callable ``params -> torch.optim.Optimizer`` called once per layer (the net then owns it: its
    state is in ``state_dict()``).

    readout: None/False, True (a readout with the default hyper-parameters) or a dict of
    ``FFReadout`` keyword arguments plus ``skip_first`` (default True): a linear softmax over the
    concatenated normalised outputs of the layers (the first skipped when there are two or more),
    for the neutral-label input, trained on every ``train_labels`` batch.
    negatives: "uniform" (a wrong label drawn uniformly) or "hard" (in proportion to the network's
    predicted probability of each wrong label: the readout's softmax, recomputed every batch before
    the readout's own update, when there is a readout; else exp(total goodness), recomputed every
    epoch by ``train_epoch``).
    predict: the default method of ``predict``: "goodness" (C passes) or "readout" (one pass).
    lr_schedule: "constant", "hinton" or "loewex" (see ``lr_gain``), over ``epochs`` epochs, advanced
    by ``start_epoch()`` (``train_epoch`` calls it). init: see ``FFLinear.reset_parameters``.
    skip_nonfinite (default True): a layer step that meets NaN/inf applies no update (fused SGD; an
    optimizer still steps) and flags it in ``out.nonfinite``; ``train_epoch`` counts such steps
    per layer, so a loop can stop at the epoch's end without a host sync per step.
    unsupervised (default False): the FF paper's unsupervised experiment. The input rows are pixels
    only (no label embedded), the layers learn from real images against hybrid images
    (``train_unsupervised``/``train_unsupervised_epoch``, never a label) and the readout, which must
    predict, classifies the plain images (labels reach the readout only, on detached features).
    """

    def __init__(self, sizes: Sequence[int], config: Union[FFConfig, Sequence[FFConfig], None] = None,
                 optimizer: OptimizerSpec = "sgd", lr: float = 0.03, momentum: float = 0.0,
                 weight_decay: float = 0.0, bias: bool = True, backend: str = "auto",
                 skip_first_goodness: bool = False, device=None, dtype=None, *, dampening: float = 0.0,
                 decoupled_weight_decay: bool = False, input_norm: str = "auto", num_classes: int = 10,
                 readout=None, negatives: str = "uniform", predict: str = "goodness",
                 lr_schedule: str = "constant", epochs: Optional[int] = None, init: str = "linear",
                 skip_nonfinite: bool = True, unsupervised: bool = False):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list the input width and at least one layer, got {sizes}")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
                raise ValueError(f"sizes must be positive ints, got {sizes}")
        configs = list(config) if isinstance(config, (list, tuple)) else [config] * (len(sizes) - 1)
        if len(configs) != len(sizes) - 1:
            raise ValueError(f"config lists {len(configs)} layers but sizes defines {len(sizes) - 1}")
        _check_num_classes(num_classes)
        self.layers = nn.ModuleList(
            FFLinear(k, n, c, bias=bias, backend=backend, device=device, dtype=dtype)
            for k, n, c in zip(sizes[:-1], sizes[1:], configs))
        for layer in self.layers:
            layer.reset_parameters(init)
        self.sizes, self.num_classes, self.init = sizes, num_classes, init
        self.lr = _check_real("lr", lr)
        self.momentum = _check_real("momentum", momentum)
        self.weight_decay = _check_real("weight_decay", weight_decay)
        self.dampening = _check_real("dampening", dampening, 0.0, 1.0)
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError("decoupled_weight_decay must be a bool")
        self.decoupled_weight_decay = decoupled_weight_decay
        self.skip_first_goodness = bool(skip_first_goodness)
        if not isinstance(skip_nonfinite, bool):
            raise TypeError("skip_nonfinite must be a bool")
        self.skip_nonfinite = skip_nonfinite
        if input_norm == "auto":
            input_norm = self.layers[0].config.norm
        if input_norm not in ("l2", "rms", "none"):
            raise ValueError(f"input_norm must be 'auto', 'l2', 'rms' or 'none', got {input_norm!r}")
        self.input_norm = input_norm
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        if predict not in PREDICT:
            raise ValueError(f"predict must be one of {PREDICT}, got {predict!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if lr_schedule != "constant" and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0):
            raise ValueError(f"lr_schedule={lr_schedule!r} needs epochs (a positive int), got {epochs!r}")
        self.negatives, self.predict_method = negatives, predict
        self.lr_schedule, self.epochs = lr_schedule, epochs
        self.epoch = 0  # epochs started (the schedule's position)
        self._lr_gain = 1.0

        self.readout, self.readout_first = None, 0
        if readout:
            spec = {} if readout is True else dict(readout)
            skip = spec.pop("skip_first", True)
            self.readout_first = 1 if skip and len(self.layers) > 1 else 0
            width = sum(sizes[1 + self.readout_first:])
            self.readout = FFReadout(width, num_classes, device=self.layers[0].weight.device,
                                     dtype=self.layers[0].weight.dtype, **spec)
        if predict == "readout" and self.readout is None:
            raise ValueError("predict='readout' needs a readout (readout=True or a dict)")
        if not isinstance(unsupervised, bool):
            raise TypeError("unsupervised must be a bool")
        # unsupervised: the input is pixels only (no label slots); only a readout can classify
        if unsupervised and predict != "readout":
            raise ValueError("unsupervised=True classifies with the readout only: pass predict='readout' "
                             "(goodness prediction needs a label in the input)")
        self.unsupervised = unsupervised

        self.optimizers = None
        if optimizer == "adam":
            self.optimizers = [torch.optim.Adam(l.parameters(), lr=self.lr, weight_decay=self.weight_decay)
                               for l in self.layers]
        elif callable(optimizer):
            self.optimizers = [optimizer(l.parameters()) for l in self.layers]
        elif optimizer != "sgd":
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable, got {optimizer!r}")
        if self.optimizers is not None:
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group.setdefault("initial_lr", group["lr"])

    # ------------------------------------------------------------------ presets
    @classmethod
    def pytorch_recipe(cls, sizes: Sequence[int], **kwargs) -> "FFNet":
        """The popular PyTorch recipe (mohammadpz/pytorch_forward_forward): mean goodness, theta 2,
        l2 norm of the input and between layers, Adam lr 0.03 per layer, nn.Linear's initialisation,
        uniformly drawn wrong labels, prediction by the goodness of every layer. The source trains
        full-batch, one layer after the other; here every layer steps on every mini-batch."""
        kwargs = {"config": FFConfig.pytorch_recipe(), "optimizer": "adam", "lr": 0.03, **kwargs}
        return cls(sizes, **kwargs)

    @classmethod
    def hinton(cls, sizes: Sequence[int], epochs: int = 60, **kwargs) -> "FFNet":
        """Hinton's released code: sum goodness, threshold = width, RMS norm of the input (labels
        embedded first) and between layers, his peer normalisation (lambda 0.03); SGD lr 0.01 with
        gradient smoothing 0.9 (momentum 0.9, dampening 0.9) and decoupled weight cost 0.001; weights
        N(0, 1/fan_in), biases 0; the lr gain 1 for the first half of ``epochs``, then falling
        linearly; hard negatives from the softmax readout (no bias, lr 0.1, the same smoothing, weight
        cost 0.003) over the layers above the first, predicting (goodness prediction, the other of his
        two tests, skips the first layer too)."""
        deep = len(sizes) > 2
        kwargs = {"config": FFConfig.hinton(), "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                  "dampening": 0.9, "weight_decay": 0.001, "decoupled_weight_decay": True,
                  "skip_first_goodness": deep, "init": "normal_fan_in", "lr_schedule": "hinton",
                  "epochs": epochs, "negatives": "hard", "predict": "readout",
                  "readout": dict(lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.003,
                                  decoupled_weight_decay=True, bias=False, skip_first=True),
                  **kwargs}
        return cls(sizes, **kwargs)

    @classmethod
    def loewex(cls, sizes: Sequence[int], epochs: int = 100, **kwargs) -> "FFNet":
        """loeweX/Forward-Forward: sum goodness, threshold = width, RMS norm of the input and between
        layers, peer normalisation in its form (the gradient of 0.03 mean_j (mean m - m_j)^2 through
        the running mean, ReLU passed through); SGD lr 1e-3, momentum 0.9, coupled weight decay
        3e-4; weights N(0, 1/fan_out), biases 0; a bias-free linear classifier (lr 1e-2, weight
        decay 3e-3, momentum 0.9) on the layers above the first, predicting; uniform wrong labels;
        lr (and the classifier's) cooled down linearly in the second half of ``epochs``."""
        deep = len(sizes) > 2
        kwargs = {"config": FFConfig.loewex(), "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9,
                  "weight_decay": 3e-4, "skip_first_goodness": deep, "init": "normal_fan_out",
                  "lr_schedule": "loewex", "epochs": epochs, "negatives": "uniform", "predict": "readout",
                  "readout": dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=3e-3,
                                  decoupled_weight_decay=False, bias=False, skip_first=True),
                  **kwargs}
        return cls(sizes, **kwargs)

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {"epoch": self.epoch, "lr_gain": self._lr_gain,
                "optimizers": None if self.optimizers is None else [o.state_dict() for o in self.optimizers]}

    def set_extra_state(self, state) -> None:
        self.epoch, self._lr_gain = int(state["epoch"]), float(state["lr_gain"])
        saved = state.get("optimizers")
        if (saved is None) != (self.optimizers is None) or (saved is not None and len(saved) != len(self.optimizers)):
            raise ValueError("the state dict's optimizer state does not match this net's optimizers")
        if saved is not None:
            for opt, sd in zip(self.optimizers, saved):
                opt.load_state_dict(sd)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the optimisers the net owns keep their state beside the parameters (Adam's moments)
        for opt in self.optimizers or ():
            for st in opt.state.values():
                for key, value in st.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        st[key] = fn(value)
        return self

    def start_epoch(self) -> float:
        """Advance the learning-rate schedule by one epoch; returns the epoch's lr gain."""
        self.epoch += 1
        self._lr_gain = lr_gain(self.lr_schedule, self.epoch, self.epochs)
        for opt in self.optimizers or ():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * self._lr_gain
        return self._lr_gain

    @property
    def current_lr_gain(self) -> float:
        return self._lr_gain

    # ------------------------------------------------------------------ training
    def normalize_input(self, x):
        """The input normalisation of raw rows (labels embedded) before the first layer."""
        return normalize_rows(x, self.input_norm, self.layers[0].config.eps)

    def _check_batch(self, **named) -> None:
        """Everything a step needs, checked before any layer changes (shapes, dtypes, devices)."""
        first = self.layers[0]
        w = first.weight
        for i, layer in enumerate(self.layers):
            if layer.weight.dtype != w.dtype or layer.weight.device != w.device:
                raise ValueError(f"layer {i} holds {layer.weight.dtype} on {layer.weight.device} but layer 0 "
                                 f"{w.dtype} on {w.device}: move the whole net")
            for name in ("momentum_weight", "momentum_bias", "peer_mean"):
                buf = layer._buffers.get(name)
                spec = layer._state_buffer_spec(name)
                if buf is not None and spec is not None and (tuple(buf.shape) != spec[0]
                                                             or buf.device != layer.weight.device):
                    raise ValueError(f"layer {i}'s {name} has shape {tuple(buf.shape)} on {buf.device}, "
                                     f"expected {spec[0]} on {layer.weight.device}")
        for name, x in named.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 2:
                raise ValueError(f"{name} must be 2-D [B, K], got shape {tuple(x.shape)}")
            if x.shape[0] == 0:
                raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
            if x.shape[1] != first.in_features:
                raise ValueError(f"{name} has {x.shape[1]} features but the net's input width is "
                                 f"{first.in_features}")
            if x.dtype != w.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the net's weights are {w.dtype}")
            if x.device != w.device:
                raise ValueError(f"{name} is on {x.device} but the net is on {w.device}")
        if "x_pos" in named and "x_neg" in named:
            for i, layer in enumerate(self.layers):
                if layer.config.loss == "symba" and named["x_pos"].shape[0] != named["x_neg"].shape[0]:
                    raise ValueError(f"layer {i} uses loss='symba', which pairs rows and needs x_pos and "
                                     f"x_neg of equal batch size, got {named['x_pos'].shape[0]} and "
                                     f"{named['x_neg'].shape[0]}")

    def train_step(self, x_pos, x_neg) -> list:
        """One step of every layer, bottom up, on raw positive and negative rows (labels embedded;
        normalised here); returns each layer's FFStepOutput. Every layer is checked before any
        changes. No host synchronisation."""
        self._check_batch(x_pos=x_pos, x_neg=x_neg)
        x_pos, x_neg = self.normalize_input(x_pos), self.normalize_input(x_neg)
        outs = []
        lr = self.lr * self._lr_gain
        for i, layer in enumerate(self.layers):
            if self.optimizers is not None:
                out = layer.train_step(x_pos, x_neg, optimizer=self.optimizers[i],
                                       skip_nonfinite=self.skip_nonfinite)
            else:
                out = layer.train_step(x_pos, x_neg, lr=lr, momentum=self.momentum,
                                       weight_decay=self.weight_decay, dampening=self.dampening,
                                       decoupled_weight_decay=self.decoupled_weight_decay,
                                       skip_nonfinite=self.skip_nonfinite)
            outs.append(out)
            x_pos, x_neg = out.y_pos, out.y_neg
        return outs

    def compile_step(self, x_pos_like, x_neg_like, warmup: int = 3) -> "CapturedStep":
        """``train_step`` captured as one CUDA graph: returns a ``CapturedStep`` whose call
        ``step(x_pos, x_neg)`` (or ``step()`` after writing ``step.x_pos``/``step.x_neg``) replays the
        whole network's step with no host work beyond one graph launch, for batches of the shape,
        dtype and device of the ``*_like`` tensors (their values are not used for training).

        Needs the fused SGD (optimizer="sgd") on a CUDA device. Momentum buffers that do not exist
        yet are created as zeros, which is the first step exactly for Hinton's convention and for
        PyTorch's without dampening; with PyTorch's convention and dampening, take one eager
        ``train_step`` first. The capture runs ``warmup`` steps on a side stream (autotuning and
        workspaces happen there) and then restores every parameter and buffer, so the net is as
        it was. A change of the learning-rate gain (``start_epoch``) re-captures at the next call
        (the lr is a constant of the graph). ``torch.compile(net.train_step,
        mode="reduce-overhead")`` is the other way to the same graphs."""
        self._check_batch(x_pos=x_pos_like, x_neg=x_neg_like)
        if x_pos_like.device.type != "cuda":
            raise ValueError(f"compile_step captures a CUDA graph: x_pos_like is on {x_pos_like.device}, "
                             "the net and the batches must be on a CUDA device")
        if self.optimizers is not None:
            raise ValueError("compile_step needs optimizer='sgd' (the fused update); an optimizer's "
                             "step is captured by torch.compile(mode='reduce-overhead') instead")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        if self.momentum:
            for i, layer in enumerate(self.layers):
                if layer.momentum_weight is not None:
                    continue
                if self.dampening and not self.decoupled_weight_decay:
                    raise ValueError(f"layer {i} has no momentum buffer yet and PyTorch's first step "
                                     "(buf = grad) differs from a zero buffer with dampening: take one "
                                     "eager train_step before compile_step")
                layer.momentum_weight = torch.zeros_like(layer.weight, dtype=_momentum_dtype(layer.weight.dtype))
                if layer.bias is not None:
                    layer.momentum_bias = torch.zeros_like(layer.bias, dtype=_momentum_dtype(layer.bias.dtype))
        return CapturedStep(self, x_pos_like, x_neg_like, warmup)

    def train_labels(self, x, labels, generator: Optional[torch.Generator] = None,
                     negative_labels: Optional[torch.Tensor] = None) -> FFTrainOutput:
        """One step on images ``x`` [B, K] with their ``labels`` [B]: the readout (if any) steps on the
        neutral-label pass, the negatives carry ``negative_labels`` or wrong labels drawn per
        ``self.negatives`` (hard: from the readout's softmax before its update), then every layer
        steps (``train_step``). Hinton's order: all passes use the weights from before this step."""
        self._check_batch(x=x)
        if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},)")
        if self.unsupervised:
            raise ValueError("this net is unsupervised (no label in its input): use train_unsupervised")
        c = self.num_classes
        x_pos = embed_labels(x, labels, c)
        readout_loss, scores = None, None
        if self.readout is not None:
            feats = self.readout_features(embed_neutral_label(x, c), normalized=False)
            scores, readout_loss = self.readout.train_step(feats, labels.to(feats.device), self._lr_gain)
        if negative_labels is None:
            if self.negatives == "hard" and scores is not None:
                negative_labels = wrong_labels_from_scores(scores, labels, generator)
            else:
                negative_labels = wrong_labels(labels, c, generator)
        x_neg = embed_labels(x, negative_labels, c)
        return FFTrainOutput(self.train_step(x_pos, x_neg), readout_loss, negative_labels)

    def train_epoch(self, x, labels, batch_size: int, generator: Optional[torch.Generator] = None,
                    jitter: int = 0, drop_last: bool = False, score_batch: int = 2048) -> dict:
        """One epoch over (x, labels) in shuffled mini-batches: ``start_epoch()``, then for hard
        negatives without a readout the per-epoch goodness scores (C batched passes), then
        ``train_labels`` per batch, each image shifted by up to ``jitter`` pixels first. Returns
        {"loss": per-layer mean loss [L] tensor, "readout_loss": mean or None, "nonfinite_steps":
        per-layer count [L] of steps that met NaN/inf} (tensors: no host sync)."""
        return labelled_epoch(self, self.train_labels, self.all_label_scores, x, labels, batch_size,
                              generator, jitter, drop_last, score_batch)

    @torch.no_grad()
    def all_label_scores(self, x, score_batch: int = 2048) -> torch.Tensor:
        """``label_scores`` of every row of x, ``score_batch`` rows (times C labels) at a time."""
        return torch.cat([self.label_scores(x[i:i + score_batch]) for i in range(0, x.shape[0], score_batch)])

    def train_unsupervised(self, x, labels=None, generator: Optional[torch.Generator] = None,
                           partners: Optional[torch.Tensor] = None, image_shape=None,
                           blurs: Optional[int] = None, train_layers: bool = True) -> FFTrainOutput:
        """One unsupervised step (``unsupervised=True`` nets): positives are the images ``x`` [B, H*W],
        negatives fresh hybrids of x with ``partners`` (the same shape; default: other rows of x)
        through ``data.hybrid_mask`` (``blurs``, default by image size). The readout, if any and
        given ``labels``, steps first on the detached features of x (weights from before this step,
        as in ``train_labels``); the layers never see a label. ``train_layers=False`` trains the
        readout only (the untrained-network baseline). ``negative_labels`` of the output is None."""
        if not self.unsupervised:
            raise ValueError("train_unsupervised needs a net built with unsupervised=True (its input "
                             "holds no label slots)")
        self._check_batch(x=x)
        x_neg = hybrid_images(x, partners, image_shape=image_shape, blurs=blurs, generator=generator)
        readout_loss = None
        if self.readout is not None and labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},)")
            feats = self.readout_features(x)
            readout_loss = self.readout.train_step(feats, labels.to(feats.device), self._lr_gain)[1]
        layers = self.train_step(x, x_neg) if train_layers else []
        return FFTrainOutput(layers, readout_loss, None)

    def train_unsupervised_epoch(self, x, labels=None, batch_size: int = 100,
                                 generator: Optional[torch.Generator] = None, image_shape=None,
                                 blurs: Optional[int] = None, jitter: int = 0, drop_last: bool = False,
                                 train_layers: bool = True) -> dict:
        """One epoch of ``train_unsupervised`` over images x in shuffled mini-batches; each image's
        hybrid partner is another image of the whole set (so even a last batch of one has one),
        drawn fresh every batch; ``jitter`` shifts positives and partners first. ``labels`` (optional)
        train the readout only. Returns train_epoch's dict ("loss" None when ``train_layers`` is
        False); tensors only, no host sync."""
        _check_batch_size(batch_size)
        self._check_batch(x=x)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"x must hold at least 2 images (hybrids mix two), got {n}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (n,)):
            raise ValueError(f"labels must be a tensor of shape ({n},) (one per image) or None")
        self.start_epoch()
        dev = generator.device if generator is not None else x.device

        def step(idx):
            # a shift in [1, n) around the data set: always a different image
            shift = torch.randint(1, n, idx.shape, generator=generator, device=dev).to(x.device)
            xb, partners = x[idx], x[(idx + shift) % n]
            if jitter:
                both = jitter_images(torch.cat([xb, partners]), jitter, image_shape, generator=generator)
                xb, partners = both[:len(idx)], both[len(idx):]
            return self.train_unsupervised(xb, None if labels is None else labels[idx], generator, partners,
                                           image_shape, blurs, train_layers)

        return epoch_loop(self, x, batch_size, generator, drop_last, step)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def layer_outputs(self, x, normalized: bool = False):
        """[(y, g)] of every layer for raw rows x (normalised first unless ``normalized``)."""
        x = x if normalized else self.normalize_input(x)
        outs = []
        for layer in self.layers:
            x, g = layer.forward_with_goodness(x)
            outs.append((x, g))
        return outs

    @torch.no_grad()
    def goodness(self, x) -> torch.Tensor:
        """Goodness of every layer for raw rows x (labels embedded), [B, L] (float32, float64 for
        float64 weights)."""
        return torch.stack([g for _, g in self.layer_outputs(x)], dim=1)

    @torch.no_grad()
    def label_scores(self, x, skip_first_goodness: Optional[bool] = None,
                     num_classes: Optional[int] = None) -> torch.Tensor:
        """[B, C]: the total goodness with each label embedded in images x (first layer skipped per
        ``skip_first_goodness``); all candidates in one batch."""
        skip = self.skip_first_goodness if skip_first_goodness is None else skip_first_goodness
        c = self.num_classes if num_classes is None else _check_num_classes(num_classes)
        self._check_batch(x=x)
        if self.unsupervised:
            raise ValueError("an unsupervised net has no label in its input: goodness cannot score "
                             "labels, predict with the readout")
        b = x.shape[0]
        g = self.goodness(embed_all_labels(x, c))
        if skip and g.shape[1] > 1:
            g = g[:, 1:]
        return g.sum(dim=1).view(c, b).t()

    @torch.no_grad()
    def readout_features(self, x, normalized: bool = False) -> torch.Tensor:
        """The readout's input for rows x (labels already embedded: the neutral label for
        prediction): the concatenated outputs of the layers it reads, each in RMS form (unit mean
        square per row: y itself for norm "rms", sqrt(N) y for "l2", y / rms(y) for "none"), so one
        readout learning rate serves every norm."""
        feats = []
        for layer, (y, _) in list(zip(self.layers, self.layer_outputs(x, normalized)))[self.readout_first:]:
            norm = layer.config.norm
            if norm == "l2":
                y = y * math.sqrt(layer.out_features)
            elif norm == "none":
                y = normalize_rows(y, "rms", layer.config.eps)
            feats.append(y)
        return torch.cat(feats, dim=1)

    @torch.no_grad()
    def readout_logits(self, x) -> torch.Tensor:
        """Readout logits [B, C] for images x (the neutral label embedded here; an unsupervised net
        reads the plain images)."""
        if self.readout is None:
            raise ValueError("this net has no readout (construct it with readout=True or a dict)")
        self._check_batch(x=x)
        # an unsupervised net's input is the plain image (no label slots to fill)
        x = x if self.unsupervised else embed_neutral_label(x, self.num_classes)
        return self.readout(self.readout_features(x))

    @torch.no_grad()
    def predict(self, x, num_classes: Optional[int] = None, skip_first_goodness: Optional[bool] = None,
                method: Optional[str] = None) -> torch.Tensor:
        """Predicted labels of images x [B, K]: "goodness" (the label whose embedding gives the highest
        total goodness, C passes in one batch) or "readout" (the softmax readout on the neutral-label
        pass); default ``self.predict_method``."""
        method = method or self.predict_method
        if num_classes is not None:
            _check_num_classes(num_classes)
        if method == "goodness":
            return self.label_scores(x, skip_first_goodness, num_classes).argmax(dim=1)
        if method == "readout":
            if num_classes is not None and num_classes != self.num_classes:
                raise ValueError(f"the readout predicts {self.num_classes} classes, not {num_classes}")
            return self.readout_logits(x).argmax(dim=1)
        raise ValueError(f"method must be one of {PREDICT}, got {method!r}")

    @torch.no_grad()
    def live_fraction(self, x, labels, min_active: float = 0.01) -> torch.Tensor:
        """[L]: the fraction of each layer's units that are live, i.e. active (h > 0) on at least
        ``min_active`` of the rows of images x with their true labels embedded (plain images for an
        unsupervised net)."""
        outs = self.layer_outputs(x if self.unsupervised else embed_labels(x, labels, self.num_classes))
        return torch.stack([((y > 0).float().mean(0) >= min_active).float().mean() for y, _ in outs])


class CapturedStep:
    """A whole ``FFNet.train_step`` as a replayable CUDA graph (made by ``FFNet.compile_step``).

    ``x_pos``/``x_neg`` are the graph's static inputs; ``outputs`` the per-layer FFStepOutput of
    the last replay (static tensors, overwritten by the next replay: copy what you keep)."""

    def __init__(self, net: FFNet, x_pos_like, x_neg_like, warmup: int):
        self.net = net
        self.x_pos = x_pos_like.detach().clone()
        self.x_neg = x_neg_like.detach().clone()
        self.warmup = warmup
        self.outputs = None
        self._graph, self._lr_gain = None, None
        self._stream = torch.cuda.Stream(device=self.x_pos.device)

    def _capture(self) -> None:
        net = self.net
        state = [t for t in list(net.layers.parameters()) + list(net.layers.buffers())]
        saved = [t.detach().clone() for t in state]
        self._graph = self.outputs = None
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):  # autotuning, workspaces and lazy state, outside the capture
                net.train_step(self.x_pos, self.x_neg)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            outputs = net.train_step(self.x_pos, self.x_neg)
        with torch.no_grad():
            for t, old in zip(state, saved):
                t.copy_(old)
        self._graph, self.outputs, self._lr_gain = graph, outputs, net.current_lr_gain

    def __call__(self, x_pos: Optional[torch.Tensor] = None, x_neg: Optional[torch.Tensor] = None):
        """Copy the batch in (if given), replay, and return the per-layer FFStepOutput."""
        for name, src, dst in (("x_pos", x_pos, self.x_pos), ("x_neg", x_neg, self.x_neg)):
            if src is None:
                continue
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype \
                    or src.device != dst.device:
                raise ValueError(f"{name} must be a {tuple(dst.shape)} {dst.dtype} tensor on {dst.device} "
                                 "(the captured shape)")
            dst.copy_(src)
        if self._graph is None or self._lr_gain != self.net.current_lr_gain:
            self._capture()
        self._graph.replay()
        return self.outputs
