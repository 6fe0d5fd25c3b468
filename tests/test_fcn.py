"""FCN / MCFCN against MONAI's (with an independent torchvision-style ResNet50 in torchvision's place),
and loading torchvision ResNet50 checkpoints."""
import pytest
import torch

import ahnet_fast
from tests._monai import run_model
from tests._torchvision_like import RefResNet50, fake_torchvision_models, randomise_batchnorm
from tests.conftest import assert_close_normwise

fcn_mod = pytest.importorskip("monai.networks.blocks.fcn")


@pytest.fixture
def monai_fcn(monkeypatch):
    monkeypatch.setattr(fcn_mod, "models", fake_torchvision_models())
    return fcn_mod


def _pair(monai_fcn, cls_name, kwargs, dtype):
    torch.manual_seed(3)
    theirs = getattr(monai_fcn, cls_name)(pretrained=False, **kwargs)
    randomise_batchnorm(theirs)
    ours = getattr(ahnet_fast, cls_name)(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


CASES = [("FCN", dict(out_channels=2, upsample_mode="bilinear"), (2, 3, 45, 38)),
         ("FCN", dict(out_channels=1, upsample_mode="transpose"), (2, 3, 64, 32)),
         ("MCFCN", dict(in_channels=5, out_channels=3, upsample_mode="bilinear"), (2, 5, 33, 40)),
         ("MCFCN", dict(in_channels=1, upsample_mode="transpose"), (2, 1, 32, 64))]


@pytest.mark.parametrize("cls_name,kwargs,shape", CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_monai_float64(monai_fcn, cls_name, kwargs, shape, train):
    theirs, ours = _pair(monai_fcn, cls_name, kwargs, torch.float64)
    theirs.train(train), ours.train(train)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, ref = run_model(ours, x), run_model(theirs, x)
    atol = 1e-12 * torch.cat([g.flatten() for g in ref[2].values()]).norm().item()
    assert_close_normwise(got[0], ref[0], 1e-10, what="output")
    assert_close_normwise(got[1], ref[1], 1e-10, what="input grad")
    for name in ref[2]:
        assert_close_normwise(got[2][name], ref[2][name], 1e-10, atol, what=name)
    for name in ref[3]:
        assert_close_normwise(got[3][name].double(), ref[3][name].double(), 1e-10, what=name)


@pytest.mark.parametrize("cls_name,kwargs,shape", CASES[:2])
def test_matches_monai_float32_eval(monai_fcn, cls_name, kwargs, shape):
    theirs, ours = _pair(monai_fcn, cls_name, kwargs, torch.float32)
    theirs.eval(), ours.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got, ref = run_model(ours, x), run_model(theirs, x)
    assert_close_normwise(got[0], ref[0], 1e-5)
    assert_close_normwise(got[1], ref[1], 1e-5)


def test_encoder_is_a_torchvision_resnet50():
    ours = ahnet_fast.FCN()
    encoder = [ours.conv1, ours.bn0, ours.layer1, ours.layer2, ours.layer3, ours.layer4]
    n = sum(p.numel() for m in encoder for p in m.parameters())
    assert n + 2048 * 1000 + 1000 == 25_557_032  # torchvision's resnet50 parameter count, fc included
    assert n + 2048 * 1000 + 1000 == sum(p.numel() for p in RefResNet50().parameters())


def _encoder(fcn, x):
    x = fcn.maxpool(torch.relu(fcn.bn0(fcn.conv1(x))))
    return fcn.layer4(fcn.layer3(fcn.layer2(fcn.layer1(x))))


@pytest.mark.parametrize("source", ["dict", "file", "wrapped"])
def test_load_resnet50_weights(tmp_path, source):
    torch.manual_seed(0)
    ref = randomise_batchnorm(RefResNet50()).eval()
    state = ref.state_dict()
    if source == "file":
        path = tmp_path / "resnet50.pth"
        torch.save(state, path)
        arg = str(path)
    elif source == "wrapped":  # DataParallel prefixes inside a {"state_dict": ...} checkpoint
        arg = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        arg = state
    ours = ahnet_fast.MCFCN(in_channels=2).load_resnet50_weights(arg).eval()
    assert torch.equal(ours.bn0.running_var, ref.bn1.running_var)
    x = torch.randn(1, 3, 64, 64)
    assert_close_normwise(_encoder(ours, x), ref.features(x), 1e-6)


def test_load_resnet50_weights_rejects_wrong_checkpoints(tmp_path):
    state = RefResNet50().state_dict()
    fcn = ahnet_fast.FCN()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.2.")}
    with pytest.raises(ValueError, match="missing"):
        fcn.load_resnet50_weights(missing)
    with pytest.raises(ValueError, match="unexpected"):
        fcn.load_resnet50_weights({**state, "head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shape"):
        fcn.load_resnet50_weights({**state, "conv1.weight": torch.zeros(64, 1, 7, 7)})
    with pytest.raises(ValueError, match="no such file"):
        fcn.load_resnet50_weights(str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="state dict or a path"):
        fcn.load_resnet50_weights([1, 2])
    # nothing was half-loaded by the failed calls
    assert not torch.equal(fcn.conv1.weight, torch.zeros(64, 3, 7, 7))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="never downloads"):
        ahnet_fast.FCN(pretrained=True)
    with pytest.raises(ValueError, match="upsample_mode"):
        ahnet_fast.FCN(upsample_mode="trilinear")
    with pytest.raises(ValueError, match="3 input channels"):
        ahnet_fast.FCN()(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D input"):
        ahnet_fast.MCFCN(in_channels=2)(torch.randn(1, 2, 32, 32, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        ahnet_fast.FCN(upsample_mode="transpose")(torch.randn(1, 3, 48, 64))
