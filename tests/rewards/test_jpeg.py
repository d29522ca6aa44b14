"""DDPO JPEG rewards (mmgrpo/rewards/jpeg.py) on real PIL encodes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.rewards import registry
from mmgrpo.rewards.jpeg import jpeg_size_kb, to_pil_images


def _images() -> torch.Tensor:
    torch.manual_seed(0)
    const = torch.full((1, 3, 32, 32), 0.5)  # [1, 3, H, W]
    noise = torch.rand(1, 3, 32, 32)  # [1, 3, H, W]
    return torch.cat([const, noise])  # [N=2, 3, H, W]


def test_to_pil_rounds_like_ddpo():
    # (x * 255).round(): 0.0 -> 0, 0.2 -> 51.0 -> 51, 0.5 -> 127.5 -> 128 (half to even), 1.0 -> 255
    x = torch.tensor([0.0, 0.2, 0.5, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)  # [1, 3, 1, 4]
    (im,) = to_pil_images(x)
    assert im.mode == "RGB" and im.size == (4, 1)
    assert np.asarray(im)[0, :, 0].tolist() == [0, 51, 128, 255]
    # a 1-channel image is repeated to RGB
    (gray,) = to_pil_images(torch.tensor([1.0]).view(1, 1, 1, 1))
    assert np.asarray(gray).tolist() == [[[255, 255, 255]]]


def test_constant_is_more_compressible_than_noise():
    x = _images()
    comp = registry.get("jpeg_compressibility")(x, None, None, None)  # [2]
    incomp = registry.get("jpeg_incompressibility")(x, None, None, None)  # [2]
    assert comp.shape == (2,) and comp.dtype == torch.float32
    assert comp[0] > comp[1]  # -kB: the constant image is smaller
    assert incomp[1] > incomp[0]
    assert torch.equal(incomp, -comp)


def test_exact_size_equals_a_hand_pil_encode():
    x = _images()[1:]  # the noise image [1, 3, 32, 32]
    arr = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [32, 32, 3] uint8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    n_bytes = len(buf.getvalue())
    # kB = bytes / 1000 (DDPO), e.g. 1234 bytes -> 1.234 kB -> compressibility -1.234
    expected = -(n_bytes / 1000)
    got = registry.get("jpeg_compressibility", quality=95)(x, None, None, None)
    assert got.item() == pytest.approx(expected, abs=0, rel=1e-7)  # float32 of the same number
    assert jpeg_size_kb(Image.fromarray(arr), 95) == n_bytes / 1000


def test_pil_list_matches_tensor_and_quality_matters():
    x = _images()
    pils = to_pil_images(x)
    fn = registry.get("jpeg_incompressibility")
    assert torch.equal(fn(pils, None, None, None), fn(x, None, None, None))
    rgba = pils[1].convert("RGBA")  # converted back to RGB before encoding
    assert fn([rgba], None, None, None).item() == fn(x[1:], None, None, None).item()
    low = registry.get("jpeg_incompressibility", quality=10)(x[1:], None, None, None)
    assert low.item() < fn(x[1:], None, None, None).item()  # quality 10 throws away detail: fewer bytes


def test_user_errors():
    fn = registry.get("jpeg_compressibility")
    with pytest.raises(UserError, match=r"\(x \+ 1\) / 2"):
        fn(_images() * 2 - 1, None, None, None)  # [-1, 1] images
    with pytest.raises(UserError, match="shape"):
        fn(torch.zeros(2, 4, 3, 8, 8), None, None, None)  # video [N, F, 3, H, W]
    with pytest.raises(UserError, match="quality"):
        registry.get("jpeg_compressibility", quality=0)
