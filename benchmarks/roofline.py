"""Roofline of every op and of the AH-Net training step: FLOPs, minimum bytes, and how close the
fused path gets to the machine's ceilings, both measured in the same run.

- Ceilings: the matmul rate (a large square fp32 GEMM; bf16 on CUDA too) and the copy bandwidth
  (a large tensor copy: read + write bytes over time). An op whose tensors fit in the caches can
  move its bytes faster than a copy of a large tensor does; so each op is judged against the
  faster of that copy and a copy moving as many bytes as the op's minimum (its own working set),
  and a fraction of the roof above 100% is a measurement error that benchmarks/report.py refuses.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the op's pure-PyTorch reference, forward
  and backward (the fused kernels compute the same products; FlopCounterMode sees only ATen's
  matmuls and convolutions, so BatchNorm, ReLU, pooling and the loss count as 0 FLOPs: those ops are
  bound by memory traffic, and the table says so).
- Minimum bytes, forward + backward: the forward reads its input and parameters once and writes its
  output once; the backward reads the output gradient, the input (what any backward of these ops
  needs) and the parameters, and writes the input and parameter gradients. For the training step:
  the parameters read in forward and in backward, their gradients written, Adam reading parameter,
  gradient and two moments and writing parameter and moments (10 x the parameter bytes), the input
  and labels, and every tensor the fused model keeps for backward written once and read once
  (counted with saved_tensors_hooks).
- Fraction of the roof: the time the roofline allows, max(FLOPs / matmul rate, bytes / copy
  bandwidth), over the measured median time of the fused path. 100% would be a kernel at the
  machine's ceiling; the GEMM-shaped ops are judged against a square GEMM, which their thin shapes
  (20 output channels) cannot reach.

    python benchmarks/roofline.py [--device cpu|cuda] [--size 128 128 32] [--repeats 5]
        [--out benchmarks/results/roofline_cpu.md] [--json PATH] [--smoke]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import torch.nn.functional as F
from _common import backends_that_ran, finish_report, median_seconds, run_info, saved_bytes  # benchmarks/ is the script's folder

import ahnet_fast
from ahnet_fast.nn.ahnet import DenseBlock, PyramidVolumetricPooling
from ahnet_fast.benchmark import fp32_product_ceiling
from ahnet_fast.ops import aniso_conv, bn_add_relu, bn_relu, bn_relu_conv, channel_mm, _conv_paths as conv_paths
from ahnet_fast.ops.pointwise_conv import pointwise_conv
from ahnet_fast.ops.slice_max_pool import slice_max_pool
from ahnet_fast.ops.stem_conv_pool import stem_conv_pool
from ahnet_fast.ops.transposed_conv import transposed_conv


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def ceilings(device: torch.device, smoke: bool) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    n = (1 << 20) if smoke else (1 << 26 if device.type == "cpu" else 1 << 28)  # 256 MiB / 1 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), 5, sync=sync)
    out = {"copy_GBps": 2 * nbytes(src) / copy_s / 1e9}
    m = 256 if smoke else (2048 if device.type == "cpu" else 8192)
    for name, dt in (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if device.type == "cuda" else ()):
        a, b = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
        out[f"matmul_{name}_GFLOPs"] = 2 * m ** 3 / median_seconds(lambda: a @ b, 5, sync=sync) / 1e9
    if device.type == "cpu" and channel_mm.kernel_isa() == "avx512":  # what AVX-512 reaches where MKL does not
        a, b, c = torch.randn(m, m), torch.randn(m, m), torch.empty(m, m)
        out["kernel_fp32_GFLOPs"] = 2 * m ** 3 / median_seconds(
            lambda: torch.ops.ahnet_fast.channel_mm_(c, a, b, None, None, False), 5) / 1e9
    return out


def copy_rate(device: torch.device, total_bytes: int) -> float:
    """Bytes per second of a copy that reads and writes ``total_bytes`` in all (fp32)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    src = torch.randn(max(1024, total_bytes // 8), device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes(src) / median_seconds(lambda: dst.copy_(src), 7, sync=sync)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _fwd_bwd(module_or_fn, x, grad, params=()):
    def run():
        x.grad = None
        for p in params:
            p.grad = None
        module_or_fn(x).backward(grad)
    return run


def op_cases(device: torch.device, smoke: bool) -> list[dict]:
    """Per op: name, shape text, run (fused fwd+bwd), reference (the same on the reference path, for
    FLOPs), baseline (PyTorch/MONAI eager, for the ratio) and min_bytes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device)

    s = (6, 5, 3) if smoke else (64, 64, 16)
    cases = []

    # anisotropic convolutions: the dispatcher's path against PyTorch's conv3d
    for name, ci, co, k in (("aniso_conv 3x3x1", 80, 20, (3, 3, 1)), ("aniso_conv 1x1x3", 20, 20, (1, 1, 3)),
                            ("aniso_conv 1x1x1", 104, 80, (1, 1, 1))):
        x, w = randn(1, ci, *s), randn(co, ci, *k, scale=0.05)
        stride, pad = [1, 1, 1], [(kk - 1) // 2 for kk in k]
        gy = randn(1, co, *s)

        def fused(x=x, w=w, gy=gy, stride=stride, pad=pad):
            fp, bp = aniso_conv.choose("forward", x, w, stride, pad), aniso_conv.choose("backward", x, w, stride, pad)
            conv_paths.forward(fp, x, w, stride, pad)
            conv_paths.backward(bp, gy, x, w, stride, pad)

        def eager(x=x, w=w, gy=gy, stride=stride, pad=pad):
            conv_paths.forward("aten", x, w, stride, pad)
            conv_paths.backward("aten", gy, x, w, stride, pad)

        cases.append(dict(op=name, shape=f"{ci}->{co} @{'x'.join(map(str, s))}", run=fused, reference=eager,
                          baseline=eager, baseline_name="aten conv3d",
                          min_bytes=nbytes(x, gy) + nbytes(gy, x, x) + 3 * nbytes(w)))

    # BatchNorm+ReLU (training) and the BN-ReLU-conv unit
    c = 80
    x = randn(1, c, *s).requires_grad_()
    bw, bb = (randn(c).abs() + 0.5).requires_grad_(), randn(c).requires_grad_()
    gy = randn(1, c, *s)

    def bn(backend, bw=bw, bb=bb):
        return lambda t: bn_relu(t, torch.zeros(c, device=device), torch.ones(c, device=device), bw, bb,
                                         True, 0.1, 1e-5, backend=backend)

    def torch_bn(t, bw=bw, bb=bb):
        return F.relu(F.batch_norm(t, torch.zeros(c, device=device), torch.ones(c, device=device), bw, bb, True,
                                   0.1, 1e-5))

    fused_backend = "cpp" if device.type == "cpu" else "triton"
    cases.append(dict(op="bn_relu", shape=f"{c} @{'x'.join(map(str, s))}", run=_fwd_bwd(bn(fused_backend), x, gy,
                                                                                      (bw, bb)),
                      reference=_fwd_bwd(bn("reference"), x, gy, (bw, bb)), baseline=_fwd_bwd(torch_bn, x, gy, (bw, bb)),
                      baseline_name="F.batch_norm + F.relu", min_bytes=2 * nbytes(x) + 3 * nbytes(x)))

    # a bottleneck's tail, BatchNorm + residual + ReLU, at layer1 (256 channels, a quarter of the
    # dense4 map). The minimum: forward reads x and the residual and writes y; backward reads the
    # gradient, x and y (the ReLU mask) and writes the two gradients: 8 tensors. (The kernels move
    # more: a statistics pass reads x once more each way, and the gradient is read twice; counting
    # those as "minimum" put the op above 100% of a roof, an impossible figure.)
    c1, s1 = (6, s) if smoke else (256, (32, 32, 8))
    x1, r1 = randn(1, c1, *s1).requires_grad_(), randn(1, c1, *s1).requires_grad_()
    bw1, bb1 = (randn(c1).abs() + 0.5).requires_grad_(), randn(c1).requires_grad_()
    gy1 = randn(1, c1, *s1)

    def tail(backend, r1=r1, bw1=bw1, bb1=bb1, c1=c1):
        return lambda t: bn_add_relu(t, r1, torch.zeros(c1, device=device), torch.ones(c1, device=device),
                                             bw1, bb1, True, 0.1, 1e-5, backend=backend)

    def torch_tail(t, r1=r1, bw1=bw1, bb1=bb1, c1=c1):
        return F.relu(F.batch_norm(t, torch.zeros(c1, device=device), torch.ones(c1, device=device), bw1, bb1, True,
                                   0.1, 1e-5) + r1)

    # (no Triton kernel: on CUDA "auto" runs the composition)
    tail_backend = "cpp" if device.type == "cpu" else "auto"
    cases.append(dict(op="bn_add_relu", shape=f"{c1} @{'x'.join(map(str, s1))}",
                      run=_fwd_bwd(tail(tail_backend), x1, gy1, (r1, bw1, bb1)),
                      reference=_fwd_bwd(tail("reference"), x1, gy1, (r1, bw1, bb1)),
                      baseline=_fwd_bwd(torch_tail, x1, gy1, (r1, bw1, bb1)),
                      baseline_name="F.batch_norm + add + F.relu", min_bytes=8 * nbytes(x1)))

    ci, co = 104, 80
    x = randn(1, ci, *s).requires_grad_()
    bw, bb = (randn(ci).abs() + 0.5).requires_grad_(), randn(ci).requires_grad_()
    w = randn(co, ci, 1, 1, 1, scale=0.05).requires_grad_()
    gy = randn(1, co, *s)

    def unit(backend, bw=bw, bb=bb, w=w, ci=ci):
        return lambda t: bn_relu_conv(t, torch.zeros(ci, device=device), torch.ones(ci, device=device), bw, bb, True,
                                      0.1, 1e-5, w, backend=backend)

    def torch_unit(t, bw=bw, bb=bb, w=w, ci=ci):
        return F.conv3d(F.relu(F.batch_norm(t, torch.zeros(ci, device=device), torch.ones(ci, device=device), bw, bb,
                                            True, 0.1, 1e-5)), w)

    cases.append(dict(op="bn_relu_conv 1x1x1", shape=f"{ci}->{co} @{'x'.join(map(str, s))}",
                      run=_fwd_bwd(unit(fused_backend), x, gy, (bw, bb, w)),
                      reference=_fwd_bwd(unit("reference"), x, gy, (bw, bb, w)),
                      baseline=_fwd_bwd(torch_unit, x, gy, (bw, bb, w)), baseline_name="PyTorch eager",
                      min_bytes=nbytes(x, gy) + nbytes(gy, x, x) + 3 * nbytes(w)))

    # the decoder's last dense block, and pyramid pooling with the concatenation AH-Net takes
    cin = 5 if smoke else 64
    block = DenseBlock(3, 3, cin, 4, 20, 0.0).to(device)
    x = randn(1, cin, *s).requires_grad_()
    gy = randn(1, cin + 60, *s)
    params = list(block.parameters())

    def with_backend(m, backend, **kwargs):
        def run(t):
            m.backend = backend
            return m(t, **kwargs)
        return run

    baseline, baseline_name = None, "—"
    try:
        from monai.networks.nets.ahnet import DenseBlock as MonaiDenseBlock

        theirs = MonaiDenseBlock(3, 3, cin, 4, 20, 0.0).to(device)
        theirs.load_state_dict(block.state_dict())
        baseline, baseline_name = _fwd_bwd(theirs, x, gy, list(theirs.parameters())), "MONAI DenseBlock"
    except ImportError:
        pass
    cases.append(dict(op="dense_block", shape=f"{cin}->{cin + 60} @{'x'.join(map(str, s))}",
                      run=_fwd_bwd(with_backend(block, fused_backend), x, gy, params),
                      reference=_fwd_bwd(with_backend(block, "reference"), x, gy, params),
                      baseline=baseline, baseline_name=baseline_name,
                      min_bytes=nbytes(x, gy) + nbytes(gy, x, x) + 3 * sum(nbytes(p) for p in params)))

    ps = (64, 64, 2) if smoke else (64, 64, 16)
    cp = 5 if smoke else 124
    psp = PyramidVolumetricPooling(3, 4, cp, "transpose").to(device)
    x = randn(1, cp, *ps).requires_grad_()
    gy = randn(1, cp + 4, *ps)
    params = list(psp.parameters())

    baseline, baseline_name = None, "—"
    try:
        from monai.networks.nets.ahnet import PSP

        theirs_psp = PSP(3, 4, cp, "transpose").to(device)
        theirs_psp.load_state_dict(psp.state_dict())
        baseline = _fwd_bwd(lambda t: torch.cat((theirs_psp(t), t), 1), x, gy, list(theirs_psp.parameters()))
        baseline_name = "MONAI PSP + cat"
    except ImportError:
        pass
    cases.append(dict(op="pyramid_pool", shape=f"{cp}->{cp + 4} @{'x'.join(map(str, ps))}",
                      run=_fwd_bwd(with_backend(psp, fused_backend, concat_input=True), x, gy, params),
                      reference=_fwd_bwd(with_backend(psp, "reference", concat_input=True), x, gy, params), baseline=baseline,
                      baseline_name=baseline_name, min_bytes=nbytes(x, gy) + nbytes(gy, x, x)))

    # focal loss over the logits of a 128x128x32 input; slice pooling of conv1's output
    fs = (5, 4, 3) if smoke else (128, 128, 32)
    logits = randn(1, 3, *fs).requires_grad_()
    labels = torch.randint(0, 3, (1, 1, *fs), generator=g).to(device)

    def focal(backend):
        loss = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True, backend=backend)

        def run():
            logits.grad = None
            loss(logits, labels).backward()
        return run

    baseline, baseline_name = None, "—"
    try:
        from monai.losses import FocalLoss as MonaiFocalLoss

        monai_loss = MonaiFocalLoss(to_onehot_y=True, use_softmax=True)

        def baseline():
            logits.grad = None
            monai_loss(logits, labels.float()).backward()
        baseline_name = "MONAI FocalLoss"
    except ImportError:
        pass
    cases.append(dict(op="focal_loss", shape=f"3 @{'x'.join(map(str, fs))}", run=focal(None),
                      reference=focal("reference"), baseline=baseline, baseline_name=baseline_name,
                      # read logits and labels (int64 here), write the logits' gradient
                      min_bytes=2 * nbytes(logits) + nbytes(labels)))

    ss = (6, 5, 4) if smoke else (64, 64, 32)
    x = randn(1, 64 if not smoke else 3, *ss).requires_grad_()
    gy = randn(*x.shape[:-1], ss[-1] // 2)
    cases.append(dict(op="slice_max_pool", shape=f"{x.shape[1]} @{'x'.join(map(str, ss))}",
                      run=_fwd_bwd(lambda t: slice_max_pool(t, 2), x, gy),
                      reference=_fwd_bwd(lambda t: F.max_pool3d(t, (1, 1, 2), (1, 1, 2)), x, gy),
                      baseline=_fwd_bwd(lambda t: F.max_pool3d(t, (1, 1, 2), (1, 1, 2)), x, gy),
                      baseline_name="F.max_pool3d",
                      # forward: read x, write y; backward: read gy, write gx
                      min_bytes=nbytes(x, gy) + nbytes(gy, x)))

    # up2: 256 -> 256 channels, x2 (kernel = stride = 2) at a 128x128x32 input
    us = (3, 2, 2) if smoke else (16, 16, 4)
    ch = 4 if smoke else 256
    x = randn(1, ch, *us).requires_grad_()
    w = (randn(ch, ch, 2, 2, 2) * 0.05).requires_grad_()
    gy = randn(1, ch, *[2 * s for s in us])

    def up(backend):
        def run():
            x.grad = w.grad = None
            transposed_conv(x, w, None, (2, 2, 2), backend=backend).backward(gy)
        return run

    cases.append(dict(op="transposed_conv", shape=f"{ch}->{ch} x2 @{'x'.join(map(str, us))}", run=up(None),
                      reference=up("reference"), baseline=up("reference"), baseline_name="F.conv_transpose3d",
                      # forward: read x, w, write y; backward: read gy, x, w, write gx, gw
                      min_bytes=nbytes(x, w, gy) + nbytes(gy, x, w, x, w)))

    # layer2's strided downsampling projection, 256 -> 512, stride (2, 2, 1), at a 128x128x32 input
    ps = (6, 4, 2) if smoke else (32, 32, 8)
    ci, co = (4, 6) if smoke else (256, 512)
    px = randn(1, ci, *ps).requires_grad_()
    pw = (randn(co, ci, 1, 1, 1) * 0.05).requires_grad_()
    pgy = randn(1, co, (ps[0] + 1) // 2, (ps[1] + 1) // 2, ps[2])

    def proj(backend):
        def run():
            px.grad = pw.grad = None
            pointwise_conv(px, pw, None, (2, 2, 1), backend=backend).backward(pgy)
        return run

    cases.append(dict(op="pointwise_conv", shape=f"{ci}->{co} s221 @{'x'.join(map(str, ps))}", run=proj(None),
                      reference=proj("reference"), baseline=proj("reference"), baseline_name="F.conv3d",
                      # forward: read the strided input's used quarter, w, write y; backward: read gy, x (the
                      # used quarter), w, write gx (all of it) and gw
                      min_bytes=nbytes(px) // 4 + nbytes(pw, pgy) + nbytes(pgy, pw, pw) + nbytes(px) // 4 + nbytes(px)))

    # the stem: conv1 (7x7x3, stride (2, 2, 1)) and pool1 (1, 1, 2) on the image, which needs no gradient
    ss = (12, 10, 6) if smoke else tuple(2 * v for v in s)
    sx = randn(1, 1, *ss)
    sw = (randn(4 if smoke else 64, 1, 7, 7, 3) * 0.05).requires_grad_()
    sgy = randn(1, sw.shape[0], ss[0] // 2, ss[1] // 2, ss[2] // 2)

    def stem(backend):
        def run():
            sw.grad = None
            stem_conv_pool(sx, sw, None, (2, 2, 1), (3, 3, 1), 2, backend=backend).backward(sgy)
        return run

    cases.append(dict(op="stem_conv_pool", shape=f"1->{sw.shape[0]} 7x7x3 @{'x'.join(map(str, ss))}", run=stem(None),
                      reference=stem("reference"), baseline=stem("reference"),
                      baseline_name="F.conv3d + F.max_pool3d",
                      # forward: read the image and w, write the pooled map; backward: read gy, the image
                      # (the weight gradient), write gw
                      min_bytes=nbytes(sx, sw, sgy) + nbytes(sgy, sx, sw)))
    # a dense layer's bottleneck product in the last decoder block at a 128x128x32 input: BN-ReLU then
    # 104 -> 80 channels over a band of 40 of its 128 rows (64 x 16 voxels each), forward only
    mk, mm_rows, mn = (24, 20, 300) if smoke else (104, 80, 40 * 64 * 16)
    mx, mw = randn(mk, mn), randn(mm_rows, mk, scale=0.1)
    mscale, mshift, mout = torch.rand(mk, device=device) + 0.5, randn(mk), torch.empty(mm_rows, mn, device=device)

    def product(backend):
        def run():
            channel_mm.mm_into(mout, mw, mx, scale=mscale, shift=mshift, backend=backend)
        return run

    cases.append(dict(op="channel_mm", shape=f"BN-ReLU {mk}->{mm_rows} x {mn} voxels", run=product("auto"),
                      reference=product("reference"), baseline=product("reference"),
                      baseline_name="relu(x * scale + shift) then torch.mm",
                      # read x, w, scale, shift; write out
                      min_bytes=nbytes(mx, mw, mscale, mshift, mout)))
    # the same band's 3x3x1 convolution (80 -> 20 channels, BN-ReLU first) on channel_mm_conv_ (taps
    # read in place) against torch's convolution (oneDNN) of the activation written out
    ck, cco, cspatial = (8, 8, (5, 6, 4)) if smoke else (80, 20, (40, 64, 16))
    cx, cw = randn(ck, *cspatial), randn(cco, ck, 3, 3, 1, scale=0.1)
    cscale, cshift = torch.rand(ck, device=device) + 0.5, randn(ck)
    cout = torch.empty(cco, *cspatial, device=device)

    def tap_conv(backend):
        def run():
            channel_mm.conv_into(cout, cw, cx, scale=cscale, shift=cshift, backend=backend)
        return run

    cases.append(dict(op="channel_mm", shape=f"conv 3x3x1 BN-ReLU {ck}->{cco} @{'x'.join(map(str, cspatial))}",
                      run=tap_conv("auto"), reference=tap_conv("reference"), baseline=tap_conv("reference"),
                      baseline_name="relu(x * scale + shift) then F.conv3d (oneDNN)",
                      # read x (each value once at best), w, scale, shift; write out
                      min_bytes=nbytes(cx, cw, cscale, cshift, cout)))
    return cases


def step_case(device: torch.device, size, smoke: bool) -> dict:
    """The training step (forward + focal loss + backward + Adam) of AHNet at 1x1xsize, 3 classes."""
    psp = 0 if smoke else 4
    torch.manual_seed(0)
    net = ahnet_fast.AHNet(in_channels=1, out_channels=3, psp_block_num=psp).to(device)
    loss_fn = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, *size, generator=g).to(device)
    y = torch.randint(0, 3, (1, 1, *size), generator=g).to(device)

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    reference_loss = ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True, backend="reference")

    def reference():
        net.set_backend("reference")
        try:
            net.zero_grad(set_to_none=True)
            reference_loss(net(x), y).backward()
        finally:
            net.set_backend(None)

    params = list(net.parameters())
    kept, _ = saved_bytes(lambda: loss_fn(net(x), y), exclude=params)
    p_bytes = sum(nbytes(p) for p in params)
    baseline, baseline_name = None, "—"
    try:
        from monai.losses import FocalLoss as MonaiFocalLoss
        from monai.networks.nets import AHNet as MonaiAHNet

        theirs = MonaiAHNet(in_channels=1, out_channels=3, psp_block_num=psp).to(device)
        theirs.load_state_dict(net.state_dict())
        theirs_loss = MonaiFocalLoss(to_onehot_y=True, use_softmax=True)
        theirs_opt = torch.optim.Adam(theirs.parameters(), lr=1e-4)

        def baseline():
            theirs_opt.zero_grad(set_to_none=True)
            theirs_loss(theirs(x), y.float()).backward()
            theirs_opt.step()
        baseline_name = "MONAI AHNet + FocalLoss"
    except ImportError:
        pass
    return dict(op="training step", shape=f"1x1x{'x'.join(map(str, size))}", run=run, reference=reference,
                baseline=baseline, baseline_name=baseline_name,
                min_bytes=10 * p_bytes + nbytes(x, y) + 2 * kept, flops_note="Adam's elementwise FLOPs not counted")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 32], help="the training step's input H W D")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: tests this script")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    roof = ceilings(device, args.smoke)
    peak, bw = fp32_product_ceiling(roof) * 1e9, roof["copy_GBps"] * 1e9
    lines = [f"# Roofline of ahnet_fast's ops and of the AH-Net training step — {datetime.date.today()}, {name}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32", "",
             f"Ceilings measured in this run: fp32 matmul {roof['matmul_fp32_GFLOPs']:.0f} GFLOP/s"
             + (f" (torch.mm), {roof['kernel_fp32_GFLOPs']:.0f} GFLOP/s (ahnet_fast's channel_mm kernel: the peak "
                "used below)" if "kernel_fp32_GFLOPs" in roof else "")
             + (f", bf16 matmul {roof['matmul_bf16_GFLOPs']:.0f} GFLOP/s" if "matmul_bf16_GFLOPs" in roof else "")
             + f", copy {roof['copy_GBps']:.1f} GB/s. Forward + backward, median of {args.repeats} (the step: "
             "+ Adam). FLOPs: torch.utils.flop_counter over the reference path (matmuls and convolutions only: "
             "0 marks a memory-bound op). Min bytes: each input, output, gradient and parameter moved once per "
             "pass (see roofline.py). Roof time = max(FLOPs / matmul peak, bytes / copy bandwidth); "
             "'of roof' = roof time / measured time. Speed-up = baseline time / fused time, same run.", "",
             "| op | shape | GFLOP | min MB | fused ms | GFLOP/s | % matmul peak | GB/s | % copy bw | bound | "
             "of roof | baseline | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    records = []
    cases = op_cases(device, args.smoke) + [step_case(device, (64, 64, 32) if args.smoke else tuple(args.size),
                                                       args.smoke)]
    for case in cases:
        flops = count_flops(case["reference"])
        _, ran = backends_that_ran(case["run"])
        t = median_seconds(case["run"], args.repeats, sync=sync)
        tb = median_seconds(case["baseline"], args.repeats, sync=sync) if case["baseline"] else None
        b = case["min_bytes"]
        case_bw = max(bw, copy_rate(device, b))  # the op's working set may sit in the caches
        roof_t = max(flops / peak, b / case_bw)
        bound = "compute" if flops / peak > b / case_bw else "memory"
        rec = dict(op=case["op"], shape=case["shape"], flops=flops, min_bytes=b, ms=t * 1e3,
                   gflops_per_s=flops / t / 1e9, pct_matmul_peak=100 * flops / t / peak,
                   gbytes_per_s=b / t / 1e9, pct_copy_bw=100 * b / t / case_bw, copy_GBps=case_bw / 1e9,
                   bound=bound, backends=ran,
                   fraction_of_roof=roof_t / t, baseline=case["baseline_name"],
                   baseline_ms=tb * 1e3 if tb else None, speedup=tb / t if tb else None)
        records.append(rec)
        lines.append(f"| {rec['op']} | {rec['shape']} | {flops / 1e9:.3f} | {b / 1e6:.1f} | {rec['ms']:.2f} | "
                     f"{rec['gflops_per_s']:.1f} | {rec['pct_matmul_peak']:.0f}% | {rec['gbytes_per_s']:.1f} | "
                     f"{rec['pct_copy_bw']:.0f}% | {bound} | {100 * rec['fraction_of_roof']:.0f}% | "
                     f"{rec['baseline']} | " + (f"{rec['speedup']:.2f}x |" if tb else "— |"))
        print(lines[-1], flush=True)
        save(args, lines, name, device, roof, records)  # after every row: a time cap still leaves what was measured
    lines += ["", "Adam's elementwise arithmetic is not in the step's FLOPs; its bytes are (10 x the parameters)."]
    save(args, lines, name, device, roof, records)


def save(args, lines, name, device, roof, records):
    finish_report(lines, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run_info(device.type, name), ceilings=roof, results=records), f, indent=1)


if __name__ == "__main__":
    main()
