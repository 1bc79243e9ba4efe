"""Our FID Inception vs pytorch-fid's network, both loaded with the same random state dict (nothing downloaded)."""
import numpy as np
import pytest
import torch

from eval.inception import FID_WEIGHTS_NAME, FIDInceptionV3, InceptionFeatures, load_fid_inception, random_fid_inception


def _pytorch_fid_network(state_dict, monkeypatch):
    """pytorch-fid's InceptionV3 wrapper (blocks, resize, normalisation) around its FID-patched torchvision
    Inception, built from its own classes; its weight download is replaced by our state dict."""
    pfi = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid not installed (pip install -r requirements-test.txt)")
    import torchvision

    def local_fid_inception_v3():
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        net.load_state_dict(state_dict, strict=True)
        return net

    def no_download(*args, **kwargs):
        raise AssertionError("the test must never download weights")

    monkeypatch.setattr(pfi, "fid_inception_v3", local_fid_inception_v3)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", no_download)
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    return theirs.eval(), local_fid_inception_v3().eval()


@pytest.fixture(scope="module")
def random_net():
    torch.set_num_threads(1)
    return random_fid_inception(seed=0)


def test_features_equal_pytorch_fid_with_same_random_weights(random_net, monkeypatch):
    state_dict = random_net.state_dict()
    theirs, their_tv = _pytorch_fid_network(state_dict, monkeypatch)
    ours = InceptionFeatures(random_net, channels_last=False)  # same memory layout as pytorch-fid: same kernels
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 32x32 like our samples
    with torch.no_grad():
        out = ours(img)
        fast = InceptionFeatures(random_net)(img)  # default channels_last: only float reassociation differs
        pool_theirs = theirs(img)[0].flatten(1)
        # spatial: hook the 1x1 branch of Mixed_6d (TF mixed_6/conv) inside their network
        grabbed = {}
        hook = theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: grabbed.setdefault("s", o))
        theirs(img)
        hook.remove()
        spatial_theirs = grabbed["s"][:, :7].permute(0, 2, 3, 1).flatten(1)
        logits_theirs = pool_theirs @ their_tv.fc.weight.T
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 7 * 17 * 17) and out["logits"].shape == (2, 1008)
    assert out["pool"].std() > 0.1  # random weights still give non-degenerate features
    torch.testing.assert_close(out["pool"], pool_theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["spatial"], spatial_theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["logits"], logits_theirs, rtol=1e-5, atol=1e-5)
    for key, theirs_value in (("pool", pool_theirs), ("spatial", spatial_theirs)):
        torch.testing.assert_close(fast[key], theirs_value, rtol=1e-4, atol=1e-4)


def test_fid_blocks_differ_from_torchvision_blocks(random_net):
    """Guards the test above against passing trivially: torchvision's own blocks give other features."""
    import torchvision

    tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    tv.load_state_dict(random_net.state_dict(), strict=True)
    tv.eval()
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours = random_net(x)["pool"]
        captured = {}
        hook = tv.avgpool.register_forward_hook(lambda m, i, o: captured.setdefault("p", o.flatten(1)))
        tv(x)
        hook.remove()
    assert (ours - captured["p"]).abs().max() > 1e-3


def test_state_dict_keys_match_torchvision_layout(random_net):
    import torchvision

    tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    assert set(FIDInceptionV3().state_dict()) == set(tv.state_dict())


def test_missing_weights_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid") as err:
        load_fid_inception(tmp_path / FID_WEIGHTS_NAME)
    assert "--inception" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no path was given"):
        InceptionFeatures.from_file(None)


def test_wrong_weights_file_is_rejected(tmp_path, random_net):
    bad = tmp_path / "imagenet_inception.pth"
    sd = {k: v for k, v in random_net.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's ImageNet head
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="1000-class"):
        load_fid_inception(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a readable"):
        load_fid_inception(junk)


def test_load_from_file_round_trip(tmp_path, random_net):
    path = tmp_path / FID_WEIGHTS_NAME
    torch.save(random_net.state_dict(), path)
    net = InceptionFeatures.from_file(path)
    assert len(net.weights_sha256) == 64
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        np.testing.assert_array_equal(net(x)["pool"].numpy(), InceptionFeatures(random_net)(x)["pool"].numpy())
