"""AHNet.copy_from: the paper's 2D->3D transfer, tested by what it means, not only by what it copies."""
import pytest
import torch
import torch.nn.functional as F

import ahnet_fast
from tests._torchvision_like import randomise_batchnorm
from tests.conftest import assert_close_normwise


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    net2d = randomise_batchnorm(ahnet_fast.FCN(out_channels=2), seed=1).double().eval()
    net3d = ahnet_fast.AHNet(out_channels=2).double()
    net3d.copy_from(net2d)
    return net2d, net3d.eval()


def test_conv1_slice_z_sees_slices_z_minus_1_to_z_plus_1(pair):
    net2d, net3d = pair
    depth = 5
    x = torch.randn(2, 1, 32, 36, depth, dtype=torch.float64)
    out3d = net3d.conv1(x)
    padded = F.pad(x[:, 0], (1, 1))  # zero slices beyond both ends, as the 3D conv pads
    for z in range(depth):
        stacked = padded[..., z:z + 3].permute(0, 3, 1, 2)  # (z-1, z, z+1) as three channels
        assert_close_normwise(out3d[..., z], net2d.conv1(stacked), 1e-12, what=f"slice {z}")


LAYERS = (3, 4, 6, 3)  # AHNet's and FCN's default block counts
# every block but the first of layers 2-4 (stride 2 in-plane, and its downsample branch pools the
# slice axis) keeps stride 1 and the slice axis; layer1 also as a whole
STRIDE1_BLOCKS = [("layer1", None)] + [(f"layer{i}", j) for i, n in enumerate(LAYERS, 1) for j in range(n)
                                       if i == 1 or j > 0]


def test_the_stride1_blocks_are_those_tested(pair):
    """STRIDE1_BLOCKS lists exactly the encoder blocks whose convolutions keep stride 1 and whose
    downsample branch, if any, pools nothing."""
    _, net3d = pair
    assert tuple(len(getattr(net3d, f"layer{i}")) for i in range(1, 5)) == LAYERS
    stride1 = []
    for i in range(1, 5):
        for j, block in enumerate(getattr(net3d, f"layer{i}")):
            # block.pool (1x1x2) pools the main branch only when the downsample branch changed the shape
            strided = [m for m in (block.conv1, block.conv2, block.conv3, *(block.downsample or ()))
                       if isinstance(m, (torch.nn.Conv3d, torch.nn.MaxPool3d))]
            if all(tuple(m.stride) == (1, 1, 1) for m in strided):
                stride1.append((f"layer{i}", j))
    assert stride1 == STRIDE1_BLOCKS[1:]


@pytest.mark.parametrize("layer,block", STRIDE1_BLOCKS,
                         ids=[f"{layer}" if block is None else f"{layer}[{block}]" for layer, block in STRIDE1_BLOCKS])
def test_stride1_encoder_blocks_act_slice_by_slice(pair, layer, block):
    """layer1 (stride 1 throughout) and every stride-1 block of the encoder equal their 2D
    counterpart applied to each slice (eval mode: running statistics were transferred too)."""
    net2d, net3d = pair
    m2, m3 = getattr(net2d, layer), getattr(net3d, layer)
    if block is not None:
        m2, m3 = m2[block], m3[block]
    channels = m3[0].conv1.in_channels if block is None else m3.conv1.in_channels
    x = torch.randn(1, channels, 12, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(channels))
    with torch.no_grad():
        out3d = m3(x)
        assert out3d.shape[-1] == x.shape[-1]
        for z in range(x.shape[-1]):
            assert_close_normwise(out3d[..., z], m2(x[..., z]), 1e-12, what=f"{layer}[{block}] slice {z}")


def test_batchnorm_statistics_are_copied(pair):
    net2d, net3d = pair
    pairs = [(net2d.bn0, net3d.bn0), (net2d.layer3[2].bn2, net3d.layer3[2].bn2),
             (net2d.layer4[0].downsample[1], net3d.layer4[0].downsample[2])]
    for b2, b3 in pairs:
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(b2, name), getattr(b3, name)), name


def test_agrees_with_monai_copy_from_on_what_monai_copies():
    """MONAI's copy_from (weights and BN affine only) run on our FCN gives the same convolution and
    BN weights; ours additionally carries the running statistics."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net2d = randomise_batchnorm(ahnet_fast.MCFCN(in_channels=4), seed=2)
    for in_channels in (1, 2):
        theirs = monai_nets.AHNet(in_channels=in_channels)
        theirs.copy_from(net2d)
        ours = ahnet_fast.AHNet(in_channels=in_channels).copy_from(net2d)
        t, o = theirs.state_dict(), ours.state_dict()
        encoder = [k for k in t if k.split(".")[0] in ("conv1", "bn0", "layer1", "layer2", "layer3", "layer4")]
        for k in encoder:
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            assert torch.equal(o[k], t[k]), k
        assert torch.equal(o["bn0.running_var"], net2d.bn0.running_var)
        assert not torch.equal(t["bn0.running_var"], net2d.bn0.running_var)


def test_copy_from_rejects_what_it_cannot_transfer():
    net2d = ahnet_fast.FCN()
    with pytest.raises(ValueError, match="spatial_dims=2"):
        ahnet_fast.AHNet(spatial_dims=2).copy_from(net2d)
    with pytest.raises(ValueError, match="layer1 has 3 blocks"):
        ahnet_fast.AHNet(layers=(1, 1, 1, 1)).copy_from(net2d)
    with pytest.raises(ValueError, match="FCN/MCFCN-like"):
        ahnet_fast.AHNet().copy_from(torch.nn.Conv2d(3, 64, 7))


def test_transferred_network_trains():
    """After transfer the 3D network runs forward and backward at a real input size."""
    net2d = ahnet_fast.FCN()
    net3d = ahnet_fast.AHNet(out_channels=2, psp_block_num=1).copy_from(net2d)
    y = net3d(torch.randn(1, 1, 64, 64, 32))
    y.square().mean().backward()
    assert y.shape == (1, 2, 64, 64, 32) and net3d.conv1.weight.grad.abs().sum() > 0
