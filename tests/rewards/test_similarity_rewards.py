"""Similarity-to-a-reference rewards (mmgrpo/rewards/similarity.py) on REAL architectures with random weights, saved in
each model's standard format and loaded back through the rewards' own loaders (no download), checked against the
packages' own forward (lpips.LPIPS, dreamsim's PEFT-wrapped PerceptualModel)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.rewards import registry
from mmgrpo.rewards import similarity as sim

CTX = RewardContext(group_size=2)


def rand_images(n, h, w, seed=1):
    torch.manual_seed(seed)
    return torch.rand(n, 3, h, w)


def save_png(t: torch.Tensor, path) -> torch.Tensor:
    """Save Float[3, H, W] as an 8-bit PNG; return what reading it back gives (the uint8-quantised image)."""
    u8 = (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(u8).save(path)
    return torch.from_numpy(u8.astype(np.float32) / 255).permute(2, 0, 1)


# ---------------------------------------------------------------- LPIPS


def lpips_setup(tmp_path, net):
    """A random torchvision trunk saved in torchvision's key format, and lpips.LPIPS holding the same trunk.

    LPIPS(pnet_rand=True) builds its trunk with tv.<arch>(weights=None) first thing, so after the same seed its
    random trunk equals the torchvision model's: the direct computation never goes through our key mapping.
    """
    lpips_pkg = pytest.importorskip("lpips")
    import torchvision

    arch = sim.LPIPS_BACKBONES[net][0]
    torch.manual_seed(0)
    tv_net = getattr(torchvision.models, arch)(weights=None)
    if net == "alex":  # the whole torchvision state dict (classifier too) as .safetensors
        path = tmp_path / "alexnet.safetensors"
        save_file({k: v.contiguous() for k, v in tv_net.state_dict().items()}, str(path))
    else:  # features only, as a torch state dict (read with weights_only=True)
        path = tmp_path / f"{arch}.pth"
        torch.save({k: v for k, v in tv_net.state_dict().items() if k.startswith("features.")}, path)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated pretrained=False
        warnings.simplefilter("ignore")
        direct = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    first = next(iter(direct.net.state_dict().values()))
    torch.testing.assert_close(first, tv_net.features[0].weight, atol=0, rtol=0)  # same trunk, by the seed
    return str(path), direct


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """trunk(net) -> (weights path, lpips.LPIPS with the same trunk), built once per module."""
    d, built = tmp_path_factory.mktemp("lpips"), {}

    def get(net):
        if net not in built:
            built[net] = lpips_setup(d, net)
        return built[net]

    return get


def lpips_direct(direct, x, ref):
    """lpips' own forward on [0, 1] inputs (normalize=True maps them to [-1, 1]) -> Float[n]."""
    with torch.no_grad():
        return direct(x, ref.expand(x.shape[0], -1, -1, -1), normalize=True).flatten()


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_equals_the_lpips_module_on_a_saved_torchvision_trunk(trunk, tmp_path, net):
    weights, direct = trunk(net)
    ref = save_png(rand_images(1, 64, 64, seed=2)[0], tmp_path / "ref.png")  # [3, 64, 64], uint8-quantised
    fn = registry.get("lpips", net=net, backbone_weights=weights, batch_size=3)
    assert not fn.model.loaded  # building the reward loads nothing
    x = rand_images(4, 64, 64)
    x[3] = ref  # row 3 is the reference itself
    got = fn(x, ["p"] * 4, [{"reference": str(tmp_path / "ref.png")}] * 4, CTX)
    assert fn.model.loaded and got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, -lpips_direct(direct, x, ref), atol=1e-5, rtol=1e-5)
    # identical images: every layer's normalised feature difference is 0, so LPIPS = sum of 0s = 0
    assert got[3].abs() < 1e-6
    assert (got[:3] < -1e-4).all()  # random images differ: -LPIPS < 0


def test_lpips_resizes_to_the_reference_and_reads_a_reference_path_once(trunk, tmp_path):
    weights, direct = trunk("alex")
    ref = save_png(rand_images(1, 32, 32, seed=3)[0], tmp_path / "style.png")  # [3, 32, 32]
    fn = sim.lpips(backbone_weights=weights, reference=str(tmp_path / "style.png"))  # fixed reference, meta unused
    x = rand_images(2, 48, 40)  # [2, 3, 48, 40] -> resized (squash) to the reference's 32 x 32
    got = fn(x, ["a", "b"], None, CTX)
    small = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(got, -lpips_direct(direct, small, ref), atol=1e-5, rtol=1e-5)
    # a flat grey 48 x 48 sample resizes to flat grey 32 x 32: against a flat grey reference LPIPS is 0
    grey = torch.full((3, 32, 32), 128 / 255)
    save_png(grey, tmp_path / "grey.png")
    flat = sim.lpips(backbone_weights=weights, reference=str(tmp_path / "grey.png"))
    assert flat(torch.full((1, 3, 48, 48), 128 / 255), ["a"], None, CTX).abs().item() < 1e-6
    # the reference file is read once: overwriting it does not change this reward's scores, a new reward sees it
    save_png(rand_images(1, 32, 32, seed=4)[0], tmp_path / "style.png")
    torch.testing.assert_close(fn(x, ["a", "b"], None, CTX), got, atol=0, rtol=0)
    assert list(fn.references.cache) == [str(tmp_path / "style.png")]
    fresh = sim.lpips(backbone_weights=weights, reference=str(tmp_path / "style.png"))(x, ["a", "b"], None, CTX)
    assert (fresh - got).abs().max() > 1e-3


def test_lpips_per_row_references_from_meta_and_pil_samples(trunk, tmp_path):
    weights, direct = trunk("alex")
    ref_a, ref_b = rand_images(1, 32, 32, seed=5)[0], rand_images(1, 40, 40, seed=6)[0]  # B=2 references
    meta = [{"style": ref_a}, {"style": ref_a}, {"style": ref_b}, {"style": ref_b}]  # G=2 rows each
    x = rand_images(4, 32, 32)
    pil = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for t in x]
    q = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pil])
    got = sim.lpips(backbone_weights=weights, reference_key="style", batch_size=1)(pil, ["p"] * 4, meta, CTX)
    want_a = -lpips_direct(direct, q[:2], ref_a)  # rows 0, 1: 32 x 32 like ref_a, no resize
    big = F.interpolate(q[2:], size=(40, 40), mode="bilinear", antialias=True, align_corners=False)
    want_b = -lpips_direct(direct, big, ref_b)  # rows 2, 3: upsampled to ref_b's 40 x 40
    torch.testing.assert_close(got, torch.cat([want_a, want_b]), atol=1e-5, rtol=1e-5)


def test_lpips_user_errors(trunk, tmp_path):
    weights, _ = trunk("alex")
    with pytest.raises(UserError, match="did you mean 'alex'"):
        sim.lpips(net="alx", backbone_weights=weights)
    with pytest.raises(UserError, match="needs backbone_weights=PATH.*alexnet-owt-7be5be79.pth"):
        sim.lpips()  # refused when built, not at the first step
    with pytest.raises(UserError, match="not a torchvision squeezenet1_1 state dict"):
        sim.lpips(net="squeeze", backbone_weights=weights)(
            rand_images(1, 32, 32), ["p"], [{"reference": ref_t()}], CTX
        )
    fn = sim.lpips(backbone_weights=weights)
    with pytest.raises(UserError, match=r"rows \[1\] have no meta\['reference'\]"):
        fn(rand_images(2, 32, 32), ["p", "q"], [{"reference": ref_t()}, {}], CTX)
    with pytest.raises(UserError, match="0 meta rows for 2 samples"):
        fn(rand_images(2, 32, 32), ["p", "q"], None, CTX)
    with pytest.raises(UserError, match="does not exist"):
        fn(rand_images(1, 32, 32), ["p"], [{"reference": str(tmp_path / "nope.png")}], CTX)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        fn(rand_images(1, 32, 32), ["p"], [{"reference": ref_t() * 2 - 1}], CTX)


def ref_t():
    return rand_images(1, 32, 32, seed=7)[0]


# ---------------------------------------------------------------- DreamSim


@pytest.fixture(scope="module")
def dreamsim_dir(tmp_path_factory):
    """dreamsim's cache_dir for dreamsim_type='open_clip_vitb32', as its release zip unpacks: a random ViT-B/32
    backbone in dreamsim's open_clip-as-DINO format ({'state_dict': ..., 'proj'}) and a PEFT LoRA adapter folder.
    Returns (dir, the PEFT model the files were saved from)."""
    pytest.importorskip("dreamsim")
    from dreamsim import PerceptualModel
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("dreamsim")
    torch.manual_seed(0)
    vit = vit_base(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(768)  # what load_open_clip_as_dino expects (CLIP's ln_pre)
    sd = dict(vit.state_dict(), proj=torch.randn(768, 512) / 768**0.5)  # proj: [width, embed_dim]
    torch.save({"state_dict": sd}, d / "open_clip_vitb32_pretrain.pth.tar")
    base = PerceptualModel(
        model_type="open_clip_vitb32", feat_type="embedding", stride="32", lora=True, load_dir=str(d), device="cpu"
    )
    base.normalize_embeds = True  # as dreamsim() builds it
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at 0 (a no-op adapter): make it matter, so loading it is tested
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(str(d / "open_clip_vitb32_single_lora"))
    return d, peft_model.eval()


def dreamsim_direct(model, x, ref):
    """dreamsim's own forward: 1 - cosine(embed(x), embed(ref)) on 224 x 224 inputs in [0, 1] -> Float[n]."""
    with torch.no_grad():
        return model(x, ref.expand(x.shape[0], -1, -1, -1))


def test_dreamsim_equals_the_dreamsim_model_loaded_from_its_cache_dir(dreamsim_dir):
    d, model = dreamsim_dir
    fn = registry.get("dreamsim", cache_dir=str(d), batch_size=3)
    assert not fn.model.loaded
    ref = rand_images(1, 224, 224, seed=2)[0]
    x = rand_images(4, 224, 224)  # already 224 x 224: no resize, so equality is exact up to float
    x[3] = ref
    got = fn(x, ["p"] * 4, [{"reference": ref}] * 4, CTX)
    want = dreamsim_direct(model, x, ref)
    torch.testing.assert_close(got, -want, atol=1e-5, rtol=1e-5)
    assert got[3].abs() < 1e-5  # the reference itself: cosine 1, distance 1 - 1 = 0
    with model.disable_adapter():  # without the LoRA adapter the scores differ: the adapter was really loaded
        assert (dreamsim_direct(model, x[:3], ref) - want[:3]).abs().max() > 1e-3


def test_dreamsim_resizes_to_224_and_caches_the_reference_embedding(dreamsim_dir, tmp_path):
    d, model = dreamsim_dir
    ref = save_png(rand_images(1, 32, 32, seed=3)[0], tmp_path / "style.png")
    fn = sim.dreamsim(cache_dir=str(d), reference_key="style")
    x = rand_images(2, 64, 48)
    got = fn(x, ["a", "b"], [{"style": str(tmp_path / "style.png")}] * 2, CTX)

    def to224(t):  # dreamsim's transform: bicubic resize to 224 x 224 (antialiased, clipped to [0, 1] as PIL does)
        return F.interpolate(t, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    torch.testing.assert_close(got, -dreamsim_direct(model, to224(x), to224(ref[None])), atol=1e-5, rtol=1e-5)
    (emb,) = fn.references.cache.values()  # one path, embedded once: [1, D] with D = 512 (ViT-B/32 projection)
    assert emb.shape == (1, 512)


def test_dreamsim_refuses_what_would_download(tmp_path):
    with pytest.raises(UserError, match=r"torch\.hub\.load\('facebookresearch/dino:main'\)"):
        sim.dreamsim(cache_dir=str(tmp_path), dreamsim_type="ensemble")
    with pytest.raises(UserError, match="dinov2"):
        sim.dreamsim(cache_dir=str(tmp_path), dreamsim_type="dinov2_vitb14")
    with pytest.raises(UserError, match="did you mean 'clip_vitb32'"):
        sim.dreamsim(cache_dir=str(tmp_path), dreamsim_type="clip_vitb23")
    with pytest.raises(UserError, match="needs cache_dir=DIR"):
        sim.dreamsim()
    (tmp_path / "open_clip_vitb32_single_lora").mkdir()
    (tmp_path / "open_clip_vitb32_single_lora" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="lacks open_clip_vitb32_pretrain.pth.tar, open_clip_vitb32_single_lora/ad"):
        sim.dreamsim(cache_dir=str(tmp_path))


# ---------------------------------------------------------------- ImageReward, registry


def test_image_reward_says_why_it_is_not_built_in():
    with pytest.raises(UserError, match=r"pip install image-reward.*timm==0\.6\.13"):
        registry.get("image_reward", checkpoint="ImageReward.pt")


def test_similarity_rewards_are_registered_with_descriptions():
    names = registry.available()
    for name in ("lpips", "dreamsim", "image_reward"):
        assert name in names and names[name]


def test_a_reference_photo_is_read_upright(tmp_path):
    """EXIF orientation 6 (a phone photo): stored 32 wide x 24 high, shown 24 x 32; the samples it is compared with
    are upright, so the reference is too (as the VLM inputs and Wan's first frames)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((24, 32, 3), np.uint8)
    stored[:, :4] = 255  # the stored image's left edge: the top once turned
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ref = sim.load_reference(tmp_path / "phone.jpg")
    assert ref.shape == (3, 32, 24) and ref[:, :4].mean() > 0.8 and ref[:, 8:].mean() < 0.1
