"""Model-backed image rewards on tiny REAL models: saved in their standard formats, loaded back through the
rewards' own loading paths, checked against the model's own forward."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

from mmgrpo import rewards
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.rewards import image as img_rewards
from mmgrpo.rewards.registry import REWARDS
from mmgrpo.testing.tiny_clip import MEAN, STD, TINY_CLIP, save_tiny_clip, tiny_clip

PROMPTS = ["a red circle", "a red circle", "a blue square", "a blue square"]  # B=2 prompts, G=2


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny open_clip model saved as .safetensors and as a torch .bin state dict, plus its JSON config."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def images(n=4, size=32):
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size)


def expected_cosine(net, x, prompts):
    """The model's own forward on hand-normalised pixels: (normalised image feats * normalised text feats)."""
    tokens = open_clip.tokenize(prompts)
    with torch.no_grad():
        img_f, txt_f, _ = net((x - MEAN) / STD, tokens)  # both L2-normalised by CLIP.forward
    return (img_f * txt_f).sum(-1)


# ---------------------------------------------------------------- clip_score


@pytest.mark.parametrize("fname", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_clip_score_equals_model_forward(clip_files, fname):
    d, net = clip_files
    fn = img_rewards.clip_score(pretrained=str(d / fname), model_config=str(d / "tiny.json"), batch_size=3)
    assert not fn.model.loaded  # the factory loads nothing
    x = images()
    got = fn(x, PROMPTS, [{}] * 4, RewardContext(group_size=2))
    assert fn.model.loaded
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected_cosine(net, x, PROMPTS), atol=1e-5, rtol=1e-5)
    # list of PIL at native size scores like the tensor (up to uint8 quantisation)
    pil = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for t in x]
    q = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pil])
    torch.testing.assert_close(fn(pil, PROMPTS, [{}] * 4, None), expected_cosine(net, q, PROMPTS), atol=1e-5, rtol=0)


def test_clip_score_from_an_open_clip_local_dir(clip_files, tmp_path):
    # the hub layout of open_clip models: open_clip_config.json {model_cfg, preprocess_cfg} + weights in one folder
    _, net = clip_files
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    x = images()
    got = img_rewards.clip_score(model=f"local-dir:{tmp_path}")(x, PROMPTS, None, None)
    torch.testing.assert_close(got, expected_cosine(net, x, PROMPTS), atol=1e-5, rtol=0)


def test_clip_score_resizes_like_open_clips_own_transform(clip_files):
    d, net = clip_files
    fn = img_rewards.clip_score(pretrained=str(d / "open_clip_model.safetensors"), model_config=str(d / "tiny.json"))
    torch.manual_seed(2)
    u8 = (torch.rand(2, 3, 48, 40) * 255).round().to(torch.uint8)  # [N, 3, H=48, W=40]: shortest side 40 -> 32
    pp = image_transform_v2(PreprocessCfg(size=32), is_train=False)  # PIL: resize, crop, norm
    pixel = torch.stack([pp(Image.fromarray(t.permute(1, 2, 0).numpy())) for t in u8])
    with torch.no_grad():
        img_f, txt_f, _ = net(pixel, open_clip.tokenize(PROMPTS[1:3]))
    want = (img_f * txt_f).sum(-1)
    got = fn(u8, PROMPTS[1:3], [{}] * 2, None)
    # torch antialiased bicubic vs PIL bicubic on uint8: close, not bit-equal
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_clip_score_bf16_and_batch_size_invariance(clip_files):
    d, net = clip_files
    kw = {"pretrained": str(d / "open_clip_model.safetensors"), "model_config": str(d / "tiny.json")}
    x = images()
    a = img_rewards.clip_score(batch_size=1, **kw)(x, PROMPTS, None, None)
    b = img_rewards.clip_score(batch_size=4, **kw)(x, PROMPTS, None, None)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    c = img_rewards.clip_score(dtype="bfloat16", **kw)(x, PROMPTS, None, None)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, a, atol=3e-2, rtol=0)


def test_clip_score_user_errors(clip_files):
    d, _ = clip_files
    with pytest.raises(UserError, match="needs CLIP weights: set pretrained="):
        img_rewards.clip_score()  # refused when built, not at the first step
    with pytest.raises(UserError, match="set clip_pretrained="):
        img_rewards.aesthetic(head="head.pth")
    with pytest.raises(UserError, match="did you mean 'ViT-B-32'"):
        img_rewards.clip_score(model="ViT-B-23", pretrained=str(d / "open_clip_model.safetensors"))(
            images(1), ["x"], None, None
        )
    with pytest.raises(UserError, match="dtype 'half8'"):
        img_rewards.clip_score(dtype="half8")
    fn = img_rewards.clip_score(pretrained=str(d / "open_clip_model.safetensors"), model_config=str(d / "tiny.json"))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        fn(images(2) * 2 - 1, ["a", "b"], None, None)  # VAE range [-1, 1] by mistake
    with pytest.raises(UserError, match="text prompts"):
        fn(images(2), [3, 4], None, None)
    with pytest.raises(UserError, match=r"Float\[N, 3, H, W\]"):
        fn(torch.rand(2, 32, 32), ["a", "b"], None, None)


class Box:  # an arbitrary pickled object: torch.load(weights_only=True) must refuse it
    pass


def test_pickled_object_is_refused(tmp_path):
    torch.save({"state_dict": Box()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        img_rewards.read_state_dict(tmp_path / "evil.pt")


# ---------------------------------------------------------------- hpsv2


def test_hpsv2_accepts_wrapped_and_prefixed_checkpoints(clip_files, tmp_path):
    d, net = clip_files
    wrapped = {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "HPS_v2.1_compressed.pt")
    x = images()
    for ckpt in (tmp_path / "HPS_v2.1_compressed.pt", d / "open_clip_model.safetensors"):
        fn = img_rewards.hpsv2(checkpoint=str(ckpt), model_config=str(d / "tiny.json"))
        torch.testing.assert_close(fn(x, PROMPTS, None, None), expected_cosine(net, x, PROMPTS), atol=1e-5, rtol=0)


def test_hpsv2_pads_the_longest_side_like_hpsv2(clip_files):
    d, net = clip_files
    fn = img_rewards.hpsv2(checkpoint=str(d / "open_clip_model.safetensors"), model_config=str(d / "tiny.json"))
    x = torch.rand(1, 3, 16, 32)  # [1, 3, 16, 32] -> fits 32 wide; 8 black rows above and below
    padded = torch.zeros(1, 3, 32, 32)
    padded[:, :, 8:24] = x
    torch.testing.assert_close(fn(x, ["a"], None, None), expected_cosine(net, padded, ["a"]), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="checkpoint="):
        img_rewards.hpsv2()


def test_checkpoint_of_another_architecture_is_a_user_error(clip_files, tmp_path):
    d, _ = clip_files
    save_file({"visual.conv1.weight": torch.zeros(2, 3, 8, 8)}, str(tmp_path / "other.safetensors"))
    fn = img_rewards.hpsv2(checkpoint=str(tmp_path / "other.safetensors"), model_config=str(d / "tiny.json"))
    with pytest.raises(UserError, match="does not fit the model"):
        fn(images(1), ["a"], None, None)


def test_a_clip_checkpoint_of_a_tiny_model_under_the_default_model_name_is_a_user_error(clip_files):
    """The tiny CLIP's weights with the default model ViT-B-32 (model_config forgotten) failed in open_clip's
    resizing: "AssertionError: text pos_embed width changed!" at the first step."""
    d, _ = clip_files
    fn = img_rewards.clip_score(pretrained=str(d / "open_clip_model.safetensors"))
    with pytest.raises(UserError, match="does not fit the model.*check the model name / model_config"):
        fn(images(1), ["a"], None, None)


def test_a_clip_local_dir_or_device_this_machine_lacks_is_refused_when_the_reward_is_built(clip_files, tmp_path):
    """model='local-dir:DIR' without open_clip_config.json was open_clip's FileNotFoundError at the first call;
    device=cuda on a machine without a GPU torch's "Found no NVIDIA driver", after the policy had loaded."""
    d, _ = clip_files
    with pytest.raises(UserError, match=r"model='local-dir:.*' holds no open_clip_config.json; a local-dir: model"):
        rewards.get("clip_score", model=f"local-dir:{d}")
    with pytest.raises(UserError, match="is not a folder"):
        rewards.get("clip_score", model=f"local-dir:{tmp_path / 'missing'}")
    rewards.get("clip_score", pretrained=str(d / "open_clip_model.safetensors"), device="auto")  # a word torch
    # cannot parse is the factory's to read (a plug-in's 'auto', 'balanced'), not refused here
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device='cuda', but torch sees no CUDA GPU on this machine"):
            rewards.get("clip_score", pretrained=str(d / "open_clip_model.safetensors"), device="cuda")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match=rf"device='cuda:{count}', but torch sees"):
        rewards.get("clip_score", pretrained=str(d / "open_clip_model.safetensors"), device=f"cuda:{count}")


# ---------------------------------------------------------------- aesthetic


def laion_head_state_dict(in_dim: int) -> dict[str, torch.Tensor]:
    """The released predictor's layout, built independently: Linear/Dropout alternating as in simple_inference.py."""
    torch.manual_seed(3)
    layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    return {"layers." + k: v for k, v in layers.state_dict().items()}


def test_aesthetic_head_loads_the_real_key_layout(tmp_path):
    sd = laion_head_state_dict(768)
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert sd["layers.0.weight"].shape == (1024, 768) and sd["layers.7.weight"].shape == (1, 16)
    torch.save(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    save_file(sd, str(tmp_path / "head.safetensors"))
    z = F.normalize(torch.randn(3, 768), dim=-1)
    # the head is purely affine (no activations): out = W7 (W6 (W4 (W2 (W0 z + b0) + b2) + b4) + b6) + b7
    h = z
    for i in (0, 2, 4, 6, 7):
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    for f in ("sac+logos+ava1-l14-linearMSE.pth", "head.safetensors"):
        head = img_rewards.load_aesthetic_head(str(tmp_path / f))
        torch.testing.assert_close(head(z), h, atol=1e-5, rtol=1e-5)
    bad = dict(sd)
    bad["layers.1.weight"] = bad.pop("layers.2.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="LAION predictor layout"):
        img_rewards.load_aesthetic_head(str(tmp_path / "bad.pth"))


def test_aesthetic_scores_normalised_clip_features(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    net = tiny_clip(quick_gelu=True)  # the aesthetic reward builds OpenAI-style (QuickGELU) CLIPs by default
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    sd = laion_head_state_dict(16)  # head input dim follows the CLIP embed dim (16 here, 768 for ViT-L/14)
    torch.save(sd, tmp_path / "head.pth")
    fn = img_rewards.aesthetic(
        head=str(tmp_path / "head.pth"),
        clip_pretrained=str(tmp_path / "clip.safetensors"),
        clip_config=str(tmp_path / "tiny.json"),
    )
    x = images()
    with torch.no_grad():
        h = F.normalize(net.encode_image((x - MEAN) / STD), dim=-1)
    for i in (0, 2, 4, 6, 7):
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(fn(x, PROMPTS, None, None), h.squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.save(laion_head_state_dict(768), tmp_path / "head768.pth")
    fn = img_rewards.aesthetic(
        head=str(tmp_path / "head768.pth"),
        clip_pretrained=str(tmp_path / "clip.safetensors"),
        clip_config=str(tmp_path / "tiny.json"),
    )
    with pytest.raises(UserError, match="takes 768-d features; the CLIP gives 16"):
        fn(x, PROMPTS, None, None)


# ---------------------------------------------------------------- pickscore


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    """A tiny random CLIPModel + a hand-written CLIP BPE tokenizer + image processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("pickscore")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e</w>"), ("c", "a"), ("ca", "t</w>")]  # "re</w>", "ca", "cat</w>"
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1)
    text |= dict(num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(d)
    return d, model, tok


def test_pickscore_equals_logit_scale_times_cosine(pickscore_dir):
    d, model, tok = pickscore_dir
    fn = img_rewards.pickscore(model=str(d), batch_size=3)
    assert not fn.model.loaded
    x = images()
    prompts = ["a red cat", "a red cat", "the car", "the car"]
    got = fn(x, prompts, None, RewardContext(group_size=2))
    t = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel.forward: logits_per_image = logit_scale.exp() * cos(image_i, text_j)
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=(x - MEAN) / STD)
    want = out.logits_per_image.diagonal()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel.forward
    torch.testing.assert_close(got, 14.2849 * cos, atol=1e-4, rtol=1e-4)  # logit_scale init 2.6592: e^2.6592 = 14.2849
    assert fn.model().net.use_kernels is False  # loaded without the hub's kernels (core.safe_weights.NO_HUB_KERNELS)
    with pytest.raises(UserError, match="model="):
        img_rewards.pickscore()


# ---------------------------------------------------------------- diversity


def test_diversity_pixels_hand_computed():
    # group 0 (2x2 images, pixel_size=2 -> no resize; embedding = 2x - 1):
    #   white -> all +1 (12 values); black -> all -1; half (top row white, bottom black) -> +1,+1,-1,-1 per channel
    #   cos(white, black) = -1, cos(white, half) = 0, cos(black, half) = 0
    #   white: ((1 - -1) + (1 - 0)) / 2 = 1.5 ; black: same 1.5 ; half: ((1 - 0) + (1 - 0)) / 2 = 1.0
    # group 1: three identical grey images -> cos 1 -> diversity 0
    white, black = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    half = torch.zeros(3, 2, 2)
    half[:, 0] = 1.0
    grey = torch.full((3, 2, 2), 0.8)
    x = torch.stack([white, black, half, grey, grey, grey])  # [N=6, 3, 2, 2], B=2, G=3
    fn = img_rewards.diversity(embedder="pixels", pixel_size=2)
    assert fn.group_aware
    got = fn(x, ["p"] * 6, None, RewardContext(group_size=3))
    torch.testing.assert_close(got, torch.tensor([1.5, 1.5, 1.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="groups of G=4"):
        fn(x, ["p"] * 6, None, RewardContext(group_size=4))
    assert torch.equal(fn(x, ["p"] * 6, None, RewardContext(group_size=1)), torch.zeros(6))


def test_diversity_clip_embedder_matches_model(clip_files):
    d, net = clip_files
    fn = img_rewards.diversity(pretrained=str(d / "open_clip_model.safetensors"), model_config=str(d / "tiny.json"))
    x = images()
    with torch.no_grad():
        e = F.normalize(net.encode_image((x - MEAN) / STD), dim=-1)  # [4, 16]
    # G=2: each row's only partner is the other row of its pair
    want = torch.stack([1 - e[0] @ e[1], 1 - e[0] @ e[1], 1 - e[2] @ e[3], 1 - e[2] @ e[3]])
    torch.testing.assert_close(fn(x, PROMPTS, None, RewardContext(group_size=2)), want, atol=1e-5, rtol=0)


def test_rewards_on_the_same_weights_share_one_model_while_any_holds_it(clip_files):
    """The evaluation builds its reward again (data.options.eval_reward), and two rewards may read the same CLIP: one
    model is loaded for all loaders of the same weights, device and dtype (on a GPU a second PickScore ViT-H is
    ~4 GB), and freed with the last reward that holds it."""
    import gc
    import weakref

    d, _ = clip_files
    kw = {"pretrained": str(d / "open_clip_model.safetensors"), "model_config": str(d / "tiny.json")}
    a, b = img_rewards.clip_score(**kw), img_rewards.clip_score(batch_size=2, **kw)
    bf16 = img_rewards.clip_score(dtype="bfloat16", **kw)
    x = images()
    torch.testing.assert_close(a(x, PROMPTS, None, None), b(x, PROMPTS, None, None), atol=0, rtol=0)
    assert a.model() is b.model() and bf16.model() is not a.model()
    assert bf16.model().dtype == torch.bfloat16 and a.model().dtype == torch.float32
    held = weakref.ref(a.model())
    del a, b
    gc.collect()
    assert held() is None  # freed with the last reward that held it; a new one loads it again
    assert img_rewards.clip_score(**kw).model().dtype == torch.float32


def test_a_shared_lazy_loader_may_load_another_inside_it():
    """A loader may call another lazy loader (aesthetic's head reads the CLIP's width) while it holds the lock."""
    from mmgrpo.rewards.image_utils import _Lazy

    inner = _Lazy(lambda: torch.nn.Linear(2, 2), key=("test_inner",))
    outer = _Lazy(lambda: torch.nn.Sequential(inner()), key=("test_outer",))
    assert outer()[0] is inner()


# ---------------------------------------------------------------- registry


def test_registered_with_descriptions():
    for name in ("clip_score", "aesthetic", "pickscore", "hpsv2", "diversity"):  # similarity ones: own test file
        assert name in REWARDS and REWARDS.describe(name)
