"""Training an FFNet on several processes with torch.distributed: data parallel (``DataParallelFF``),
a forward-only layer pipeline (``PipelineFF``), and the CLI's set-up under torchrun (``init_from_env``).

Data parallel. Every rank holds the whole net and sees the whole global batch, so everything random
(shuffle, jitter, wrong labels) is drawn for the global batch from the same seeded generator on every
rank, exactly as one process would draw it; each rank then computes only its contiguous shard of rows.
Per layer, the op's gradient mode gives this shard's gradient; it is weighted by the shard's share of
the rows the loss averages over and all-reduced with ``async_op=True``, so layer l+1's step runs while
layer l's gradient travels. The fused SGD (``sgd_update_``) then applies the sum on every rank alike.
Peer normalisation depends on the whole batch: each rank runs the op without it and all-reduces the
sums it needs (the positive activities, the positive inputs), so the running mean is updated from the
global batch mean and its gradient term (p (x) colsum(x_pos), see backends.PeerNorm) is added after
the reduction, identical on every rank. The readout's gradient is all-reduced the same way, and its
logits are gathered when hard negatives are drawn from them.

Pipeline. Rank r owns consecutive layers. FF has no backward pass, so micro-batches only stream
forward: rank r steps its layers on micro-batch t while rank r+1 steps on micro-batch t-1, sending
y_pos/y_neg on with ``isend``. Each layer sees the same inputs and weights as in sequential training
of the same micro-batches, so the result is the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .backends import FFStepOutput
from .config import FFConfig
from .data import (embed_labels, embed_neutral_label, wrong_labels,
                   wrong_labels_from_scores)
from .nn import FFNet, FFTrainOutput, labelled_epoch
from .ops import ff_layer_step, sgd_update_


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_process_group(who: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{who} needs an initialised process group: call "
                         "torch.distributed.init_process_group first (or run under torchrun)")


def _check_net(net) -> None:
    if not isinstance(net, FFNet):
        raise TypeError(f"net must be an ff_kernels.FFNet, got {type(net).__name__}")


def _check_device_matches_group(net: FFNet, group) -> None:
    device = net.layers[0].weight.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"net is on {device} but the process group uses nccl, which needs CUDA "
                         "tensors: move the net to cuda:LOCAL_RANK, or use gloo on the CPU")


def shard_range(rows: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous shard of ``rows`` rows: shard sizes differ by at most
    one, the first ranks taking the extra rows (``torch.tensor_split``'s split)."""
    for name, value, low in (("rows", rows, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _step_layer(net: FFNet, i: int, x_pos, x_neg) -> FFStepOutput:
    """Layer i's local step with the net's update rule: what ``FFNet.train_step`` does per layer."""
    layer = net.layers[i]
    if net.optimizers is not None:
        return layer.train_step(x_pos, x_neg, optimizer=net.optimizers[i], skip_nonfinite=net.skip_nonfinite)
    return layer.train_step(x_pos, x_neg, lr=net.lr * net.current_lr_gain, momentum=net.momentum,
                            weight_decay=net.weight_decay, dampening=net.dampening,
                            decoupled_weight_decay=net.decoupled_weight_decay,
                            skip_nonfinite=net.skip_nonfinite)


def _positive_activity_sum(y_pos: torch.Tensor, g_pos: torch.Tensor, config: FFConfig) -> torch.Tensor:
    """sum over the positive rows of h = relu(z), recovered from the op's outputs: y = h * scale(|h|)
    with |h| = sqrt(q), q = g (goodness "sum") or g N ("mean"). Saves a GEMM over recomputing h."""
    acc, n = g_pos.dtype, y_pos.shape[1]
    if config.norm == "none":
        return y_pos.to(acc).sum(0)
    row_norm = (g_pos if config.goodness == "sum" else g_pos * n).sqrt()
    factor = row_norm + config.eps if config.norm == "l2" else row_norm / math.sqrt(n) + config.eps
    return factor @ y_pos.to(acc)


@dataclasses.dataclass
class _PendingLayer:
    """A layer's all-reduces in flight and the tensors they reduce in place."""

    works: list
    grad_weight: torch.Tensor
    grad_bias: Optional[torch.Tensor]
    stats: torch.Tensor  # [weighted loss, nonfinite, (h_pos sum [N], x_pos sum [K]) with peer norm]
    y: torch.Tensor
    g: torch.Tensor
    n_pos: int


class DataParallelFF:
    """Data-parallel training of ``net`` over the ranks of ``group`` (default: the world).

    Construction broadcasts rank 0's parameters and buffers, so every rank starts alike (every rank
    must construct it, with nets of the same shapes). ``train_labels``/``train_epoch`` take the
    *global* batch / data set, identical on every rank, with a generator seeded alike on every rank;
    they give one process's result on the whole batch (to rounding), and identical parameters on
    every rank. ``train_step`` takes this rank's shard of positive and negative rows. ``accuracy``
    evaluates shards and all-reduces the correct counts. Collectives: every rank must make the same
    calls in the same order.
    """

    def __init__(self, net: FFNet, group: Optional[dist.ProcessGroup] = None):
        _check_net(net)
        _check_process_group("DataParallelFF")
        _check_device_matches_group(net, group)
        self.net, self.group = net, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        # each rank steps without peer normalisation; the peer term is added after the all-reduce
        self._shard_configs = [dataclasses.replace(layer.config, peer_norm="none") for layer in net.layers]
        self.broadcast_state()

    @torch.no_grad()
    def broadcast_state(self, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers (momentum, peer means) to every rank."""
        source = src if self.group is None else dist.get_global_rank(self.group, src)
        for tensor in list(self.net.parameters()) + [b for b in self.net.buffers() if b is not None]:
            dist.broadcast(tensor.data, source, group=self.group)

    def _shard(self, rows: int) -> Tuple[int, int]:
        return shard_range(rows, self.rank, self.world_size)

    # ------------------------------------------------------------------ layers
    def _launch_layers(self, x_pos, x_neg, global_pos: int, global_neg: int) -> List[_PendingLayer]:
        """Every layer's shard gradient, each all-reduced asynchronously as soon as it exists."""
        net, pending = self.net, []
        for i, layer in enumerate(net.layers):
            config, acc = layer.config, _accumulation_dtype(layer.weight.dtype)
            peer = config.peer_norm != "none"
            # the loss is a mean over all rows (softplus) or over the pairs (symba)
            averaged = global_pos if config.loss == "symba" else global_pos + global_neg
            local = x_pos.shape[0] if config.loss == "symba" else x_pos.shape[0] + x_neg.shape[0]
            share = local / averaged
            bias = layer.bias.data if layer.bias is not None else None
            if x_pos.shape[0] + x_neg.shape[0] > 0:
                out = ff_layer_step(x_pos, x_neg, layer.weight.data, bias, self._shard_configs[i],
                                    backend=layer.backend)
                grad_w = out.grad_weight.to(acc).mul_(share)
                grad_b = None if bias is None else out.grad_bias.to(acc).mul_(share)
                parts = [(out.loss.to(acc) * share).reshape(1), out.nonfinite.to(acc).reshape(1)]
                if peer:
                    parts += [_positive_activity_sum(out.y_pos, out.g_pos, config), x_pos.to(acc).sum(0)]
                stats, y, g = torch.cat(parts), out.y, out.g
            else:  # a shard with no rows (a last batch smaller than the world) adds nothing
                dev = layer.weight.device
                grad_w = torch.zeros(layer.weight.shape, dtype=acc, device=dev)
                grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=dev)
                width = 2 + (layer.out_features + layer.in_features if peer else 0)
                stats = torch.zeros(width, dtype=acc, device=dev)
                y = torch.empty((0, layer.out_features), dtype=layer.weight.dtype, device=dev)
                g = torch.empty(0, dtype=acc, device=dev)
            works = [dist.all_reduce(t, group=self.group, async_op=True)
                     for t in (grad_w, grad_b, stats) if t is not None]
            pending.append(_PendingLayer(works, grad_w, grad_b, stats, y, g, x_pos.shape[0]))
            x_pos, x_neg = y[:x_pos.shape[0]], y[x_pos.shape[0]:]
        return pending

    @torch.no_grad()
    def _finish_layers(self, pending: List[_PendingLayer], global_pos: int) -> list:
        """Wait for each layer's reduced gradient, add the peer term, apply the net's update rule."""
        net, outs = self.net, []
        lr = net.lr * net.current_lr_gain
        for i, (layer, p) in enumerate(zip(net.layers, pending)):
            for work in p.works:
                work.wait()
            config = layer.config
            loss, nonfinite = p.stats[0], p.stats[1] > 0
            skip = nonfinite if net.skip_nonfinite else None
            if config.peer_norm != "none":
                n = layer.out_features
                positive_sum, input_sum = p.stats[2:2 + n], p.stats[2 + n:]
                old = layer.peer_mean
                new = old.mul(config.peer_rho).add_(positive_sum / global_pos, alpha=1.0 - config.peer_rho)
                old.copy_(new if skip is None else torch.where(skip, old, new))
                mean = layer.peer_mean
                term = (mean - mean.mean()).mul_(config.peer_kappa(n, global_pos))
                p.grad_weight.addr_(term, input_sum)
                if p.grad_bias is not None:
                    p.grad_bias.add_(term, alpha=global_pos)
            grads = [(layer.weight, p.grad_weight, "momentum_weight")]
            if layer.bias is not None:
                grads.append((layer.bias, p.grad_bias, "momentum_bias"))
            if net.optimizers is not None:
                for param, grad, _ in grads:
                    param.grad = grad.to(param.dtype)
                net.optimizers[i].step()
            else:
                for param, grad, name in grads:
                    buffer = getattr(layer, name) if net.momentum else None
                    buffer = sgd_update_(param.data, grad.to(param.dtype), buffer, lr=lr,
                                         momentum=net.momentum, dampening=net.dampening,
                                         weight_decay=net.weight_decay,
                                         decoupled_weight_decay=net.decoupled_weight_decay, skip=skip,
                                         backend=layer.backend)
                    if net.momentum and getattr(layer, name) is None:
                        setattr(layer, name, buffer)
            outs.append(FFStepOutput(y=p.y, g=p.g, loss=loss, n_pos=p.n_pos, grad_weight=p.grad_weight,
                                     grad_bias=p.grad_bias, nonfinite=nonfinite, peer_mean=layer.peer_mean))
        return outs

    def train_step(self, x_pos, x_neg, global_rows: Optional[Tuple[int, int]] = None) -> list:
        """One step of every layer on this rank's shard of raw positive and negative rows (labels
        embedded; normalised here); the result is one process's step on the concatenated shards.
        ``global_rows`` = (positives, negatives) over all ranks; None: all-reduced here (one host
        sync). Returns each layer's FFStepOutput: this shard's y/g, the global loss, nonfinite flag
        and reduced gradient (with the peer term)."""
        self.net._check_batch(x_pos=x_pos, x_neg=x_neg)
        if global_rows is None:
            counts = torch.tensor([x_pos.shape[0], x_neg.shape[0]], device=x_pos.device)
            dist.all_reduce(counts, group=self.group)
            global_rows = tuple(counts.tolist())
        if (not isinstance(global_rows, (tuple, list)) or len(global_rows) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in global_rows)):
            raise ValueError(f"global_rows must be a pair of positive ints (positives, negatives), "
                             f"got {global_rows!r}")
        net = self.net
        pending = self._launch_layers(net.normalize_input(x_pos), net.normalize_input(x_neg), *global_rows)
        return self._finish_layers(pending, global_rows[0])

    # ------------------------------------------------------------------ readout
    def _launch_readout(self, x_local, labels_local, rows: int):
        """The readout's shard gradient, all-reduced asynchronously; (pending, local logits)."""
        readout, acc = self.net.readout, _accumulation_dtype(self.net.readout.weight.dtype)
        share = x_local.shape[0] / rows
        if x_local.shape[0] > 0:
            features = self.net.readout_features(embed_neutral_label(x_local, self.net.num_classes))
            logits, loss, grads = readout.gradients(features, labels_local.to(features.device))
            grads = [g.mul_(share) for g in grads]
            loss = (loss * share).reshape(1)
        else:
            params = [readout.weight] + ([readout.bias] if readout.bias is not None else [])
            grads = [torch.zeros(p.shape, dtype=acc, device=p.device) for p in params]
            loss = torch.zeros(1, dtype=acc, device=readout.weight.device)
            logits = torch.empty((0, readout.num_classes), dtype=acc, device=readout.weight.device)
        works = [dist.all_reduce(t, group=self.group, async_op=True) for t in grads + [loss]]
        return (works, grads, loss), logits

    def _finish_readout(self, pending) -> torch.Tensor:
        works, grads, loss = pending
        for work in works:
            work.wait()
        self.net.readout.apply_gradients(grads, self.net.current_lr_gain)
        return loss[0]

    def _all_gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The [rows, ...] tensor whose contiguous shards the ranks hold (padded to one size for the
        collective, which needs equal sizes)."""
        width = -(-rows // self.world_size)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[:local.shape[0]] = local
        chunks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded, group=self.group)
        sizes = [shard_range(rows, r, self.world_size) for r in range(self.world_size)]
        return torch.cat([chunk[:stop - start] for chunk, (start, stop) in zip(chunks, sizes)])

    # ------------------------------------------------------------------ global batches
    def train_labels(self, x, labels, generator: Optional[torch.Generator] = None,
                     negative_labels: Optional[torch.Tensor] = None) -> FFTrainOutput:
        """``FFNet.train_labels`` on the global batch ``x`` [B, K] / ``labels`` [B] (the same on every
        rank), each rank computing its shard. Wrong labels are drawn for the global batch (hard ones
        from the gathered readout logits), so one process with the same generator draws the same.
        Returns the layers' outputs (see ``train_step``), the global readout loss and the global
        negative labels."""
        net = self.net
        net._check_batch(x=x)
        rows = x.shape[0]
        if not isinstance(labels, torch.Tensor) or labels.shape != (rows,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({rows},)")
        if negative_labels is not None and (not isinstance(negative_labels, torch.Tensor)
                                            or negative_labels.shape != (rows,)
                                            or negative_labels.is_floating_point()):
            raise ValueError(f"negative_labels must be an integer tensor of shape ({rows},)")
        start, stop = self._shard(rows)
        x_local, labels_local = x[start:stop], labels[start:stop]
        readout_pending, scores = None, None
        if net.readout is not None:
            readout_pending, logits = self._launch_readout(x_local, labels_local, rows)
            if negative_labels is None and net.negatives == "hard":
                scores = self._all_gather_rows(logits, rows)
        if negative_labels is None:
            if scores is not None:
                negative_labels = wrong_labels_from_scores(scores, labels.to(scores.device), generator)
            else:
                negative_labels = wrong_labels(labels, net.num_classes, generator)
        x_pos = net.normalize_input(embed_labels(x_local, labels_local, net.num_classes))
        x_neg = net.normalize_input(embed_labels(x_local, negative_labels[start:stop], net.num_classes))
        pending = self._launch_layers(x_pos, x_neg, rows, rows)
        readout_loss = None if readout_pending is None else self._finish_readout(readout_pending)
        return FFTrainOutput(self._finish_layers(pending, rows), readout_loss, negative_labels)

    @torch.no_grad()
    def _label_scores(self, x, score_batch: int) -> torch.Tensor:
        """``FFNet.label_scores`` of every row of x, each rank scoring its shard."""
        start, stop = self._shard(x.shape[0])
        local = [self.net.label_scores(x[i:min(i + score_batch, stop)]) for i in range(start, stop, score_batch)]
        acc = _accumulation_dtype(self.net.layers[0].weight.dtype)
        local = torch.cat(local) if local else torch.empty((0, self.net.num_classes), dtype=acc, device=x.device)
        return self._all_gather_rows(local, x.shape[0])

    def train_epoch(self, x, labels, batch_size: int, generator: Optional[torch.Generator] = None,
                    jitter: int = 0, drop_last: bool = False, score_batch: int = 2048) -> dict:
        """``FFNet.train_epoch`` over the global data (x, labels), identical on every rank: the same
        shuffle, jitter and wrong labels as one process with the same generator, each global batch
        of ``batch_size`` rows split across the ranks. Returns the same dict (global losses)."""
        # the global batch on every rank (shuffle, jitter, wrong labels): the generator stays in step
        return labelled_epoch(self.net, self.train_labels, self._label_scores, x, labels, batch_size,
                              generator, jitter, drop_last, score_batch)

    @torch.no_grad()
    def accuracy(self, x, labels, method: Optional[str] = None, batch: int = 2048) -> float:
        """The fraction of rows of x predicted right (``FFNet.predict``), each rank predicting its
        shard; the correct counts are all-reduced, so every rank returns the same number."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty [B, K] tensor")
        if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},)")
        start, stop = self._shard(x.shape[0])
        correct = torch.zeros((), dtype=torch.int64, device=self.net.layers[0].weight.device)
        for i in range(start, stop, batch):
            j = min(i + batch, stop)
            correct += (self.net.predict(x[i:j], method=method) == labels[i:j].to(correct.device)).sum()
        dist.all_reduce(correct, group=self.group)
        return float(correct) / x.shape[0]


class PipelineFF:
    """A forward-only pipeline of ``net``'s layers over the ranks of ``group`` (default: the world):
    rank r owns ``layers_per_rank[r]`` consecutive layers (default: an even split, the first ranks
    taking the extra layers) and trains only those; every rank must hold a net of the same shapes.

    ``train_step(micro_batches)`` streams micro-batches through: rank r steps its layers on
    micro-batch t while rank r+1 steps on micro-batch t-1. Each layer sees exactly what
    ``FFNet.train_step`` on the same micro-batches in order would give it, so the owned layers end
    as in sequential training. ``sync_parameters()`` copies every layer from its owner to all ranks
    (for evaluation or saving). The readout, if any, is not trained here (as in ``FFNet.train_step``).
    """

    def __init__(self, net: FFNet, layers_per_rank: Optional[Sequence[int]] = None,
                 group: Optional[dist.ProcessGroup] = None):
        _check_net(net)
        _check_process_group("PipelineFF")
        _check_device_matches_group(net, group)
        self.net, self.group = net, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        layers = len(net.layers)
        if self.world_size > layers:
            raise ValueError(f"world_size={self.world_size} exceeds the net's {layers} layers: a pipeline "
                             "needs at least one layer per rank")
        if layers_per_rank is None:
            base, extra = divmod(layers, self.world_size)
            layers_per_rank = [base + (1 if r < extra else 0) for r in range(self.world_size)]
        layers_per_rank = list(layers_per_rank)
        if (len(layers_per_rank) != self.world_size or sum(layers_per_rank) != layers
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in layers_per_rank)):
            raise ValueError(f"layers_per_rank must list {self.world_size} positive ints summing to the "
                             f"net's {layers} layers, got {layers_per_rank}")
        self.layers_per_rank = layers_per_rank
        first = sum(layers_per_rank[:self.rank])
        self.owned = range(first, first + layers_per_rank[self.rank])
        self.owner = [r for r, count in enumerate(layers_per_rank) for _ in range(count)]
        self._global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))

    def _device(self) -> torch.device:
        return self.net.layers[0].weight.device

    def _check_micro_batches(self, micro_batches) -> None:
        if not isinstance(micro_batches, (list, tuple)) or not micro_batches:
            raise ValueError("micro_batches must be a non-empty list of (x_pos, x_neg) pairs on the first rank")
        for t, pair in enumerate(micro_batches):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"micro_batches[{t}] must be a pair (x_pos, x_neg)")
            try:
                self.net._check_batch(x_pos=pair[0], x_neg=pair[1])
            except (ValueError, TypeError) as e:
                raise type(e)(f"micro_batches[{t}]: {e}") from None

    def train_step(self, micro_batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> list:
        """Train the owned layers on ``micro_batches``, a list of (x_pos, x_neg) raw rows (labels
        embedded), given on the first rank (the others' argument is ignored: rows arrive from the
        previous rank). Returns, per micro-batch, the owned layers' FFStepOutput."""
        net, device = self.net, self._device()
        first, last = self.rank == 0, self.rank == self.world_size - 1
        count = torch.zeros(1, dtype=torch.int64, device=device)  # 0: the first rank rejected the input
        error = None
        if first:
            try:
                self._check_micro_batches(micro_batches)
                count.fill_(len(micro_batches))
            except (ValueError, TypeError) as e:
                error = e
        dist.broadcast(count, self._global(0), group=self.group)  # every rank learns how many, or stops
        if error is not None:
            raise error
        if int(count) == 0:
            raise ValueError("micro_batches: the first rank rejected its micro-batches (see its error)")
        width = net.layers[self.owned.start].in_features
        dtype = net.layers[0].weight.dtype
        sends, results = [], []
        for t in range(int(count)):
            if first:
                x_pos, x_neg = (net.normalize_input(x) for x in micro_batches[t])
            else:
                rows = torch.empty(2, dtype=torch.int64, device=device)
                dist.recv(rows, self._global(self.rank - 1), group=self.group)
                n_pos, n_neg = rows.tolist()
                x_pos = torch.empty((n_pos, width), dtype=dtype, device=device)
                x_neg = torch.empty((n_neg, width), dtype=dtype, device=device)
                dist.recv(x_pos, self._global(self.rank - 1), group=self.group)
                dist.recv(x_neg, self._global(self.rank - 1), group=self.group)
            outs = []
            for i in self.owned:
                out = _step_layer(net, i, x_pos, x_neg)
                outs.append(out)
                x_pos, x_neg = out.y_pos, out.y_neg
            if not last:  # send on and go on: the next rank works on t while this one takes t+1
                rows = torch.tensor([x_pos.shape[0], x_neg.shape[0]], dtype=torch.int64, device=device)
                for tensor in (rows, x_pos.contiguous(), x_neg.contiguous()):
                    sends.append(dist.isend(tensor, self._global(self.rank + 1), group=self.group))
            results.append(outs)
        for work in sends:
            work.wait()
        return results

    @torch.no_grad()
    def sync_parameters(self) -> None:
        """Copy every layer's parameters and training state from its owner to every rank."""
        device = self._device()
        for i, layer in enumerate(self.net.layers):
            src = self._global(self.owner[i])
            has_momentum = torch.tensor([layer.momentum_weight is not None], dtype=torch.int64, device=device)
            dist.broadcast(has_momentum, src, group=self.group)
            if bool(has_momentum) and layer.momentum_weight is None:
                layer.momentum_weight = torch.empty_like(layer.weight, dtype=layer._state_buffer_spec(
                    "momentum_weight")[1])
                if layer.bias is not None:
                    layer.momentum_bias = torch.empty_like(layer.bias, dtype=layer._state_buffer_spec(
                        "momentum_bias")[1])
            tensors = list(layer.parameters()) + [b for b in layer.buffers() if b is not None]
            for tensor in tensors:
                dist.broadcast(tensor.data, src, group=self.group)


# ---------------------------------------------------------------------- the CLI under torchrun
_INITIALISED_HERE = False


def init_from_env(device: torch.device) -> Tuple[int, int, torch.device]:
    """(rank, world_size, device) for the training CLI. Under torchrun (WORLD_SIZE > 1 in the
    environment) the default process group is initialised from the environment: nccl with
    ``cuda:LOCAL_RANK`` for a CUDA device, gloo on the CPU. Otherwise nothing happens: (0, 1, device)."""
    global _INITIALISED_HERE
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world_size <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _INITIALISED_HERE = True
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    """Destroy the process group ``init_from_env`` created, if any."""
    global _INITIALISED_HERE
    if _INITIALISED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _INITIALISED_HERE = False
