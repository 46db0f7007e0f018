"""Paper model of data-parallel vs pipeline Forward-Forward training across GPUs.

Nothing here is measured: every number follows from the assumed constants below. It prints,
as markdown, the numbers of sections 2-4 of docs/SCALING.md:

    python bench/scaling_model.py

Model (docs/SCALING.md section 1, docs/DESIGN.md section 5): one FF layer step on M = B+ + B- rows,
K inputs, N outputs is exactly two GEMMs over all M rows, the forward z = x W^T and the weight
gradient grad_W = (diag(c) H)^T X, each 2 M K N flops; there is no activation gradient dL/dx
(nothing crosses layers). A step costs max(compute floor, memory floor). Standard library only.
"""

# ---- assumptions (none measured) -------------------------------------------------------------
F = 700e12            # flop/s: assumed sustained bf16 rate on an H100 SXM (~70% of 989 TFLOP/s)
HBM = 3.35e12         # B/s: H100 SXM HBM3 bandwidth
NVLINK_BW = 450e9     # B/s per GPU: NVLink 4 bus bandwidth inside one 8-GPU node
NVLINK_P = 8
IB_BW = 50e9          # B/s per GPU: InfiniBand NDR 400 Gb/s NIC, one per GPU
IB_P = 16             # flat ring over 2 nodes, limited by the per-GPU NIC
GEMMS_PER_STEP = 2    # forward z = x W^T + weight gradient over all M rows; no dL/dx
FLOAT_BYTES = 4       # fp32 gradients and activations
WEIGHT_PASSES_BYTES = 28  # bytes per weight element a step streams (weight ~7 times in fp32)


def compute_floor(m, k, n):
    """Seconds: GEMMS_PER_STEP GEMMs of 2 M K N flops = 4 M K N / F."""
    return GEMMS_PER_STEP * 2 * m * k * n / F


def memory_floor(m, k, n):
    """Seconds: x and y streamed twice (4 (2 M K + 2 M N) bytes) plus 28 N K bytes of weight traffic."""
    return (FLOAT_BYTES * (2 * m * k + 2 * m * n) + WEIGHT_PASSES_BYTES * n * k) / HBM


def step(m, k, n):
    """One-GPU layer step: the larger of the two floors."""
    return max(compute_floor(m, k, n), memory_floor(m, k, n))


def ring_factor(p):
    return 2 * (p - 1) / p


def allreduce_bytes(k, n):
    return n * k * FLOAT_BYTES  # fp32 weight gradient; the bias (N 4 bytes) is ignored


def allreduce(k, n, p, bw):
    return ring_factor(p) * allreduce_bytes(k, n) / bw


def data_parallel(m, k, n, p, bw):
    """(sharded step, all-reduce, speed-up over one GPU); the all-reduce overlaps the next layer."""
    sharded = step(m / p, k, n)
    ar = allreduce(k, n, p, bw)
    return sharded, ar, step(m, k, n) / max(sharded, ar)


def boundary_bytes(m, n):
    """One pipeline boundary: the activations y_pos and y_neg, M N fp32 values."""
    return m * n * FLOAT_BYTES


# ---- formatting in the doc's style ------------------------------------------------------------
def us(seconds):
    t = seconds * 1e6
    return f"{t:.1f} us" if t < 99.95 else f"{t:,.0f} us"


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def mb(nbytes):
    return f"{nbytes / 1e6:.1f} MB"


def x(ratio):
    return f"{ratio:.1f}x"


def rows(value, step_=100):
    return f"{round(value / step_) * step_:,.0f}"


# ---- the shapes of section 2 ------------------------------------------------------------------
SHAPES = [  # (label, M, K, N); M counts both signs
    ("Hinton layer 1 (784 -> 2000), 100/sign", 200, 784, 2000),
    ("Hinton layers 2-4 (2000 -> 2000), 100/sign", 200, 2000, 2000),
    ("Hinton layer 1, 1000/sign", 2000, 784, 2000),
    ("Hinton layers 2-4, 1000/sign", 2000, 2000, 2000),
    ("4096 x 1024 x 1024", 4096, 1024, 1024),
    ("8192 x 4096 x 4096", 8192, 4096, 4096),
    ("16384 x 8192 x 8192", 16384, 8192, 8192),
    ("65536 x 2048 x 2048", 65536, 2048, 2048),
]


def section2():
    out = ["## 2. Per layer, per step", "",
           "| layer: M x K x N | all-reduce bytes N*K*4 | 1 GPU step | DP 8 GPUs NVLink: step / all-reduce "
           "/ speed-up | DP 16 GPUs over IB: step / all-reduce / speed-up | pipeline boundary M*N*4: bytes, "
           "NVLink / IB time |",
           "|---|---|---|---|---|---|"]
    for label, m, k, n in SHAPES:
        nv = data_parallel(m, k, n, NVLINK_P, NVLINK_BW)
        ib = data_parallel(m, k, n, IB_P, IB_BW)
        bb = boundary_bytes(m, n)
        out.append(
            f"| {label} | {mb(allreduce_bytes(k, n))} | {us(step(m, k, n))} | "
            f"{us(nv[0])} / {us(nv[1])} / {x(nv[2])} | {us(ib[0])} / {us(ib[1])} / {x(ib[2])} | "
            f"{mb(bb)}: {us(bb / NVLINK_BW)} / {us(bb / IB_BW)} |")
    out.append("")
    out.append("Bound of the one-GPU step (not a doc column): " + "; ".join(
        f"{label.split(' (')[0]}: "
        f"{'compute' if compute_floor(m, k, n) >= memory_floor(m, k, n) else 'memory'}"
        for label, m, k, n in SHAPES))
    return out


def section3():
    out = ["## 3. Where data parallel stops paying", "",
           "all-reduce / sharded step (compute-bound) = [2 (p-1)/p * 4 N K / BW] / [4 (M/p) K N / F]"
           " = 2 (p - 1) F / (M BW)", ""]
    for name, p, bw in (("8 GPUs on NVLink", NVLINK_P, NVLINK_BW), ("16 GPUs on IB", IB_P, IB_BW)):
        m_even = 2 * (p - 1) * F / bw
        out.append(f"* break-even M, {name}: F / BW = {F / bw:,.0f} flop/byte, M = 2 (p - 1) F / BW = "
                   f"{m_even:,.0f} (about {rows(m_even)}) rows")
    sat = WEIGHT_PASSES_BYTES * F / (GEMMS_PER_STEP * 2 * HBM)
    out.append(f"* rows per GPU where the sharded step stops shrinking: 28 F / (4 HBM) = {sat:,.0f} "
               f"(about {rows(sat)})")
    out.append("")
    for label, m, k, n in SHAPES:
        nv = data_parallel(m, k, n, NVLINK_P, NVLINK_BW)
        ib = data_parallel(m, k, n, IB_P, IB_BW)
        out.append(f"* {label}: 8 GPUs NVLink {x(nv[2])} (all-reduce / sharded step "
                   f"{nv[1] / nv[0]:.2f}), 16 GPUs IB {x(ib[2])} (all-reduce / sharded step {ib[1] / ib[0]:.2f})")
    # Hinton's whole net (784 -> 4 x 2000): per-layer overlap, summed over the 4 layers.
    for per_sign in (100, 1000):
        m = 2 * per_sign
        layers = [(m, 784, 2000)] + [(m, 2000, 2000)] * 3
        one = sum(step(*s) for s in layers)
        for name, p, bw in (("8 GPUs NVLink", NVLINK_P, NVLINK_BW), ("16 GPUs IB", IB_P, IB_BW)):
            dp = sum(max(data_parallel(*s, p, bw)[:2]) for s in layers)
            out.append(f"* Hinton's whole net, {per_sign}/sign, {name}: {us(one)} on 1 GPU vs {us(dp)} "
                       f"(sum of max(sharded step, all-reduce)): {one / dp:.2f}x")
    return out


def section4():
    out = ["## 4. Where the pipeline takes over", "",
           "transfer / compute of a stage of s layers, per micro-batch (compute-bound) = "
           "[M N 4 / BW] / [s 4 M K N / F] = F / (BW K s)", ""]
    for name, bw in (("NVLink", NVLINK_BW), ("InfiniBand", IB_BW)):
        out.append(f"* {name}: {F / bw:,.0f} / (K s): hidden when K s >= {F / bw:,.0f}")
    for label, m, k, n in SHAPES:
        bb = boundary_bytes(m, n)
        out.append(f"* {label}, one layer per stage: transfer / one-GPU step = NVLink "
                   f"{bb / NVLINK_BW / step(m, k, n):.2f}, IB {bb / IB_BW / step(m, k, n):.2f}")
    # Hinton's net at 100 per sign: 4 GPUs, one layer each.
    layers = [(200, 784, 2000)] + [(200, 2000, 2000)] * 3
    stages = [step(*s) for s in layers]
    transfer = boundary_bytes(200, 2000) / NVLINK_BW
    whole = sum(stages)
    slowest = max(max(stages), transfer)
    out.append(f"* Hinton's net, 100 per sign, 4 GPUs one layer each on NVLink: boundary "
               f"{mb(boundary_bytes(200, 2000))} ({us(transfer)}), stages {us(min(stages))} - {us(max(stages))}, "
               f"whole step {us(whole)}, pipeline speed-up {x(whole / slowest)}")
    # Cross-node hybrid: data parallel inside each 8-GPU node, pipeline between 2 nodes.
    m, k, n = 16384, 8192, 8192
    hop = boundary_bytes(m, n) / (NVLINK_P * IB_BW)
    per_gpu = step(m / NVLINK_P, k, n)
    in_node_ar = allreduce(k, n, NVLINK_P, NVLINK_BW)
    per_layer_node = max(per_gpu, in_node_ar)
    layers_to_hide = 1
    while layers_to_hide * per_layer_node < hop:
        layers_to_hide += 1
    out.append(f"* Hybrid, 16384 x 8192 x 8192, 2 nodes: IB boundary M N 4 / (8 x 50 GB/s) = {ms(hop)}; "
               f"per-layer step {ms(step(m, k, n))} on 1 GPU, {ms(per_gpu)} per GPU on 8 "
               f"(in-node all-reduce {ms(in_node_ar)}, so {ms(per_layer_node)} per layer with overlap); "
               f"hidden with {layers_to_hide} layers or more per node; flat 16-GPU all-reduce "
               f"{ms(allreduce(k, n, IB_P, IB_BW))} per layer")
    return out


def main():
    print(f"Assumed: F = {F / 1e12:.0f} TFLOP/s, HBM = {HBM / 1e12:.2f} TB/s, NVLink {NVLINK_BW / 1e9:.0f} GB/s "
          f"x {NVLINK_P}, IB {IB_BW / 1e9:.0f} GB/s x {IB_P}; step = max({GEMMS_PER_STEP * 2} M K N / F, "
          f"(4 (2 M K + 2 M N) + 28 N K) / HBM)\n")
    for part in (section2(), section3(), section4()):
        print("\n".join(part))
        print()


if __name__ == "__main__":
    main()
