"""Models from anywhere: a local folder, a hub id (revision, variant) through the HF cache, a single-file denoiser.

No network here: hub ids are read from an on-disk hub cache in huggingface_hub's own layout
(``mmgrpo.testing.hub``), offline, so the real hub code path runs (revision resolution, cache lookup,
``DiffusionPipeline.download``), and an id that is not cached ends in the UserError with the download command.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.models.sd3 import SD3Adapter
from mmgrpo.policies.sources import download_command, resolve_source
from mmgrpo.policies.vlm import VLMPolicyOptions, load_vlm
from mmgrpo.rewards import registry as reward_registry
from mmgrpo.testing.hub import add_snapshot, offline_hub
from mmgrpo.testing.tiny_flux import save_tiny_flux
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE as HUNYUAN_SIZE
from mmgrpo.testing.tiny_hunyuan_video import save_tiny_hunyuan_video
from mmgrpo.testing.tiny_sd import save_tiny_sd
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_components
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.testing.tiny_wan import SIZE as WAN_SIZE
from mmgrpo.testing.tiny_wan import save_tiny_wan
from mmgrpo.train.export import export_policy

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {  # family -> (checkpoint writer, policy options for its tiny sizes)
    "sd3": (save_tiny_sd3, {}),
    "flux": (save_tiny_flux, {"height": 16, "width": 16}),
    "sd": (save_tiny_sd, {}),
    "wan": (save_tiny_wan, dict(WAN_SIZE)),
    "hunyuan_video": (save_tiny_hunyuan_video, dict(HUNYUAN_SIZE)),
}
EXCLUDES = "--exclude '*.bin' --exclude '*.pt' --exclude '*.pth' --exclude '*.ckpt' --exclude '*.pkl' "
EXCLUDES += "--exclude '*.msgpack' --exclude '*.h5'"


@pytest.fixture
def hub(tmp_path):
    """An empty hub cache, read offline (HF_HUB_CACHE + HF_HUB_OFFLINE=1)."""
    with offline_hub(tmp_path / "hub") as cache:
        yield cache


def weights(adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Every module the adapter loaded (denoiser, text encoders, VAE...) -> its state dict."""
    return {k: m.state_dict() for k, m in vars(adapter).items() if isinstance(m, nn.Module)}


def kernel_flags(modules) -> list[bool]:
    """``use_kernels`` of every transformers model inside ``modules``: when true, transformers re-kernelizes the model
    at each train() / eval() switch and, on a GPU, loads layers from the hub (core.safe_weights.NO_HUB_KERNELS)."""
    from transformers import PreTrainedModel

    return [m.use_kernels for top in modules for m in top.modules() if isinstance(m, PreTrainedModel)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def sd3_with_fp16_variant(path: Path) -> Path:
    """SD3 weights of seed 0 in the plain files and of seed 1 in the *.fp16.safetensors files of one folder."""
    from diffusers import StableDiffusion3Pipeline

    save_tiny_sd3(path, seed=0)
    StableDiffusion3Pipeline(**tiny_sd3_components(1)).save_pretrained(str(path), variant="fp16")
    return path


def options(family="sd3", **kw) -> GeneratorPolicyOptions:
    return GeneratorPolicyOptions(family=family, **{**FAMILIES[family][1], **kw})


# ---------------------------------------------------------------------------------------------- local folders
def test_a_local_variant_reads_its_own_files_and_the_plain_files_stay_the_default(tmp_path):
    folder = sd3_with_fp16_variant(tmp_path / "sd3")
    assert (folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    fp16 = load_adapter(options(path=str(folder), variant="fp16"))
    plain = load_adapter(options(path=str(folder)))
    seed1 = tiny_sd3_components(1)
    assert all(torch.equal(v, seed1["transformer"].state_dict()[k]) for k, v in fp16.denoiser.state_dict().items())
    assert all(torch.equal(v, seed1["vae"].state_dict()[k]) for k, v in fp16.vae.state_dict().items())
    te = seed1["text_encoder"].state_dict()
    assert all(torch.equal(v, te[k]) for k, v in fp16.text_encoders[0].state_dict().items())
    assert not torch.equal(plain.denoiser.pos_embed.proj.weight, fp16.denoiser.pos_embed.proj.weight)
    with pytest.raises(UserError, match=r"policy.options.variant='bf16' reads the files \*\.bf16\.safetensors.*"
                       r"this folder has variants: \['fp16'\]"):  # fmt: skip
        load_adapter(options(path=str(folder), variant="bf16"))


def test_a_folder_with_only_variant_files_says_which_variant_to_set(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**tiny_sd3_components(0)).save_pretrained(str(tmp_path / "m"), variant="fp16")
    with pytest.raises(UserError, match=r"holds weights variants \['fp16'\].*set policy.options.variant: fp16"):
        load_adapter(options(path=str(tmp_path / "m")))


def test_a_component_without_the_variant_reads_its_plain_files_as_diffusers_pipelines_do(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder, seed0, seed1 = tmp_path / "m", tiny_sd3_components(0), tiny_sd3_components(1)
    StableDiffusion3Pipeline(**seed1).save_pretrained(str(folder), variant="fp16")
    (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    seed0["vae"].save_pretrained(folder / "vae")  # the VAE only in plain files (of another seed)
    with pytest.warns(UserWarning, match="vae/ has no fp16 weights; reading its plain files"):
        adapter = load_adapter(options(path=str(folder), variant="fp16"))
    assert all(torch.equal(v, seed0["vae"].state_dict()[k]) for k, v in adapter.vae.state_dict().items())
    assert all(torch.equal(v, seed1["transformer"].state_dict()[k]) for k, v in adapter.denoiser.state_dict().items())


def test_source_options_are_checked_when_the_config_loads_and_at_load(tmp_path):
    with pytest.raises(UserError, match=r"policy.options.variant='fp16.x' is not a weights variant name"):
        options(path="org/name", variant="fp16.x")
    with pytest.raises(UserError, match="policy.options.revision is empty"):
        options(path="org/name", revision=" ")
    with pytest.raises(UserError, match=r"policy.options.denoiser_file='sd3\.ckpt' is a pickle"):
        options(path="org/name", denoiser_file="sd3.ckpt")
    with pytest.raises(UserError, match=r"denoiser_file='sd3\.gguf' is not a \.safetensors file"):
        options(path="org/name", denoiser_file="sd3.gguf")
    with pytest.raises(UserError, match=r"policy.options.variant='a b' is not"):
        VLMPolicyOptions(path="org/name", variant="a b")
    with pytest.raises(UserError, match="revision='v1' is for hub ids, but policy.options.path=.* is a local folder"):
        load_adapter(options(path=str(tmp_path), revision="v1"))
    with pytest.raises(UserError, match="'a/b/c' is not a directory, and not a hub repository id"):
        load_adapter(options(path="a/b/c"))
    with pytest.raises(UserError, match="is not a directory, and not a hub repository id"):
        load_adapter(options(path=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------------- hub ids
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_loads_a_cached_hub_id_offline_as_it_loads_the_folder(tmp_path, hub, family):
    folder = FAMILIES[family][0](tmp_path / family)
    add_snapshot(hub, f"mmgrpo-test/tiny-{family}", folder)
    local = load_adapter(options(family, path=folder))
    remote = load_adapter(options(family, path=f"mmgrpo-test/tiny-{family}"))
    assert_same_weights(weights(remote), weights(local))
    parts = [m for a in (local, remote) for v in vars(a).values() for m in (v if isinstance(v, list) else [v])]
    flags = kernel_flags([m for m in parts if isinstance(m, nn.Module)])
    assert flags and not any(flags)  # the text / image encoders: no hub kernels
    assert remote.source.hub_id == f"mmgrpo-test/tiny-{family}" and Path(remote.source.path).is_relative_to(hub)
    assert local.source.hub_id is None and local.source.path == str(folder)


def test_a_vlm_uses_the_hubs_kernels_only_when_asked(tmp_path):
    from transformers.utils import is_kernels_available

    folder = save_tiny(*tiny_qwen2_vl(seed=0), tmp_path / "vlm")
    model, _ = load_vlm(str(folder), VLMPolicyOptions())
    assert kernel_flags([model]) and not any(kernel_flags([model]))  # the model and its sub-models
    if is_kernels_available():  # on a CPU the kernels fall back to torch's layers
        opted, _ = load_vlm(str(folder), VLMPolicyOptions(hub_kernels=True))
        assert opted.use_kernels is True
    else:  # an older transformers / kernels pair: transformers' own message, in one paragraph
        with pytest.raises(UserError, match="cannot load a VLM from .*[Kk]ernels"):
            load_vlm(str(folder), VLMPolicyOptions(hub_kernels=True))


def test_a_hub_revision_and_variant_select_their_snapshot_and_files(tmp_path, hub):
    main = add_snapshot(hub, "mmgrpo-test/sd3", save_tiny_sd3(tmp_path / "s0", seed=0))
    add_snapshot(hub, "mmgrpo-test/sd3", sd3_with_fp16_variant(tmp_path / "s2"), revision="v1")
    seed = {s: weights(load_adapter(options(path=save_tiny_sd3(tmp_path / f"l{s}", seed=s)))) for s in (0, 1)}
    assert_same_weights(weights(load_adapter(options(path="mmgrpo-test/sd3", revision=main))), seed[0])
    assert_same_weights(weights(load_adapter(options(path="mmgrpo-test/sd3", revision="v1", variant="fp16"))), seed[1])
    v1_plain = weights(load_adapter(options(path="mmgrpo-test/sd3", revision="v1")))  # v1's plain files: seed 0
    assert_same_weights(v1_plain, seed[0])


def test_a_hub_id_that_is_not_cached_offline_names_the_exact_download(hub):
    parts = " ".join(f"--include '{p}/*'" for p in SD3Adapter.components)
    expected = (f"hf download mmgrpo-test/absent --revision v3 --include model_index.json {parts} {EXCLUDES} "
                "--local-dir models/absent")  # fmt: skip
    with pytest.raises(UserError) as err:
        load_adapter(options(path="mmgrpo-test/absent", revision="v3", variant="fp16"))
    msg = str(err.value)
    assert expected in msg, msg
    assert msg.startswith(f"policy.options.path='mmgrpo-test/absent' is not a local folder under the current "
                          f"directory ({Path.cwd()}), so it is read as a hub repository id (revision 'v3', variant "
                          "'fp16')")  # fmt: skip
    assert "set policy.options.path: models/absent" in msg and "HF_HUB_OFFLINE=1" in msg
    # with a single-file denoiser only the transformer's config.json is needed from the repository
    with pytest.raises(UserError, match=r"--include model_index.json --include transformer/config.json --include"):
        load_adapter(options(path="mmgrpo-test/absent", denoiser_file=str(hub / "t.safetensors")))
    # a VLM: the whole repository, less pickles
    with pytest.raises(UserError) as err:
        load_vlm("mmgrpo-test/absent-vlm", VLMPolicyOptions())
    want = f"hf download mmgrpo-test/absent-vlm --revision main {EXCLUDES} --local-dir models/absent-vlm"
    assert want in str(err.value), str(err.value)


def test_the_environment_variables_alone_make_a_fresh_process_read_the_cache(tmp_path):
    folder = save_tiny_sd3(tmp_path / "sd3", seed=0)
    add_snapshot(tmp_path / "cache", "mmgrpo-test/env-sd3", folder)
    script = (
        "from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter; "
        "a = load_adapter(GeneratorPolicyOptions(path='mmgrpo-test/env-sd3')); "
        "print(a.source.path); print(float(sum(p.double().sum() for p in a.denoiser.parameters())))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    path, total = out.stdout.strip().splitlines()[-2:]
    assert Path(path).is_relative_to(tmp_path / "cache")
    expected = sum(p.detach().double().sum() for p in load_adapter(options(path=folder)).denoiser.parameters())
    assert float(total) == pytest.approx(float(expected), abs=0, rel=1e-15)


def test_a_vlm_and_the_listener_load_a_cached_hub_id_with_its_variant(tmp_path, hub):
    from mmgrpo.methods.listener import HFListenerScorer, VLMListenerScorer

    model, processor = tiny_qwen2_vl(seed=0)
    folder = save_tiny(model, processor, tmp_path / "vlm")
    fp16_model, _ = tiny_qwen2_vl(seed=3)
    fp16_model.save_pretrained(folder, variant="fp16")
    add_snapshot(hub, "mmgrpo-test/vlm", folder)
    want = fp16_model.state_dict()

    def same(m) -> bool:
        return all(torch.equal(v, want[k]) for k, v in m.state_dict().items())

    local, _ = load_vlm(str(folder), VLMPolicyOptions(variant="fp16"))
    remote, remote_processor = load_vlm("mmgrpo-test/vlm", VLMPolicyOptions(variant="fp16"))
    plain, _ = load_vlm("mmgrpo-test/vlm", VLMPolicyOptions())
    assert same(local) and same(remote) and not same(plain)
    assert remote_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    listener = VLMListenerScorer.from_pretrained("mmgrpo-test/vlm", variant="fp16")
    reward = reward_registry.get("listener", model="mmgrpo-test/vlm", variant="fp16")
    hf = HFListenerScorer.from_pretrained(reward.model)
    assert same(listener.model) and same(hf.model)
    assert not any(kernel_flags([local, remote, plain, listener.model, hf.model]))
    assert reward_registry.get("vlm_listener", model="mmgrpo-test/vlm", revision="v9").scorer.options == {
        "device": "cpu", "dtype": "float32", "family": "auto", "max_pixels": None, "revision": "v9",
        "variant": None,
    }  # fmt: skip


def test_export_of_a_policy_loaded_from_a_hub_id_copies_the_cached_pipeline(tmp_path, hub):
    add_snapshot(hub, "mmgrpo-test/sd3", sd3_with_fp16_variant(tmp_path / "sd3"), revision="v1")
    opts = options(path="mmgrpo-test/sd3", revision="v1", variant="fp16", num_steps=2)
    policy = DiffusionPolicy(load_adapter(opts), opts)
    out = export_policy(policy, tmp_path / "out")
    assert json.loads((out / "mmgrpo_export.json").read_text())["base"] == "mmgrpo-test/sd3@v1"
    assert (out / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()  # as the copied parts
    assert_same_weights(weights(load_adapter(options(path=str(out), variant="fp16"))), weights(policy.adapter))


# ---------------------------------------------------------------------------------------------- single files
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_takes_a_single_file_denoiser_in_the_diffusers_layout(tmp_path, family):
    folder = FAMILIES[family][0](tmp_path / "seed0", seed=0)
    other = load_adapter(options(family, path=FAMILIES[family][0](tmp_path / "seed1", seed=1)))
    save_file({k: v.contiguous() for k, v in other.denoiser.state_dict().items()}, tmp_path / "denoiser.safetensors")
    single = load_adapter(options(family, path=folder, denoiser_file=str(tmp_path / "denoiser.safetensors")))
    base = load_adapter(options(family, path=folder))
    assert_same_weights({"d": single.denoiser.state_dict()}, {"d": other.denoiser.state_dict()})
    for name, state in weights(base).items():  # everything else is the pipeline folder's
        if name != "denoiser":
            assert_same_weights({name: weights(single)[name]}, {name: state})


def wan_original_state_dict(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Wan (ComfyUI) key layout of a diffusers WanTransformer3DModel state dict, prefixed
    ``model.diffusion_model.`` as ComfyUI saves it: the inverse of diffusers' convert_wan_transformer_to_diffusers
    on the keys a text-to-video transformer has."""
    renames = [  # applied in order to each key
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("attn1", "self_attn"), ("attn2", "cross_attn"),
        (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
        ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
        (".norm2.", ".norm3."),  # diffusers' norm2 (before the cross-attention) is the original's norm3
        ("proj_out", "head.head"),
    ]  # fmt: skip
    out = {}
    for key, value in diffusers_state.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.endswith(".scale_shift_table"):
            new = new.replace("scale_shift_table", "modulation")
        out["model.diffusion_model." + new] = value.contiguous()
    return out


def test_an_original_layout_wan_file_is_converted_and_predicts_as_the_folder_model(tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    folder = save_tiny_wan(tmp_path / "seed0", seed=0)
    reference = load_adapter(options("wan", path=save_tiny_wan(tmp_path / "seed1", seed=1)))
    state = reference.denoiser.state_dict()
    original = wan_original_state_dict(state)
    assert not set(original) & set(state)  # nothing is in the diffusers layout: from_single_file must convert
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)  # a true inverse
    save_file(original, tmp_path / "wan_comfy.safetensors")
    single = load_adapter(options("wan", path=folder, denoiser_file=str(tmp_path / "wan_comfy.safetensors")))
    torch.manual_seed(0)
    x = torch.randn(2, *single.latent_shape())
    t = torch.tensor([900.0, 250.0])
    cond = single.encode(["a red circle", "two blue squares"])
    out = single.predict(single.denoiser, x, t, cond)
    assert torch.equal(out, reference.predict(reference.denoiser, x, t, cond))
    base = load_adapter(options("wan", path=folder))
    assert not torch.allclose(out, base.predict(base.denoiser, x, t, cond))


def test_single_file_mistakes_are_user_errors(tmp_path, hub):
    folder = save_tiny_sd3(tmp_path / "sd3", seed=0)
    state = load_adapter(options(path=folder)).denoiser.state_dict()
    save_file({k: v.contiguous() for k, v in list(state.items())[:5]}, tmp_path / "half.safetensors")
    with pytest.raises(UserError, match=r"half\.safetensors' is not a SD3Transformer2DModel with the config of"):
        load_adapter(options(path=folder, denoiser_file=str(tmp_path / "half.safetensors")))
    wan = save_tiny_wan(tmp_path / "wan", seed=0)
    original = wan_original_state_dict(load_adapter(options("wan", path=wan)).denoiser.state_dict())
    del original["model.diffusion_model.blocks.1.ffn.2.weight"]  # converts, but leaves one tensor without weights
    save_file(original, tmp_path / "wan_short.safetensors")
    with pytest.raises(UserError, match=r"does not hold every tensor of the WanTransformer3DModel of"):
        load_adapter(options("wan", path=wan, denoiser_file=str(tmp_path / "wan_short.safetensors")))
    with pytest.raises(UserError, match=r"denoiser_file='.*nope\.safetensors' is not a file"):
        load_adapter(options(path=folder, denoiser_file=str(tmp_path / "nope.safetensors")))
    url = "https://huggingface.co/mmgrpo-test/files/blob/v2/sd3/model.safetensors"
    with pytest.raises(UserError) as err:
        load_adapter(options(path=folder, denoiser_file=url))
    cmd = "hf download mmgrpo-test/files sd3/model.safetensors --revision v2 --local-dir models/files"
    assert cmd in str(err.value) and "set policy.options.denoiser_file: models/files/sd3/model.safetensors" in str(
        err.value
    )
    two = save_tiny_wan(tmp_path / "wan2", seed=0, two_experts=True)
    save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=r"has two experts .* a single file replaces one denoiser"):
        load_adapter(options("wan", path=two, denoiser_file=str(tmp_path / "x.safetensors")))


def test_the_download_command_quotes_patterns_and_lists_files():
    assert download_command("org/m", None, files=["a b.safetensors"]) == (
        "hf download org/m 'a b.safetensors' --revision main --local-dir models/m"
    )
    src = resolve_source("org/m", revision="r", variant="fp16")
    assert not src.local and src.weights("unet") == {
        "use_safetensors": True, "subfolder": "unet", "revision": "r", "variant": "fp16"
    }  # fmt: skip
    assert src.files() == {"revision": "r"} and os.fspath(src) == "org/m"


# ---------------------------------------------------------------------------------------------- init_lora
def random_lora(family: str, base: str, out: Path) -> Path:
    """A rank-2 LoRA (alpha 3) of ``base`` with random up-projections (a trained adapter's shape), exported in
    diffusers' format by the pipeline class's save_lora_weights (mmgrpo export) to ``out``."""
    ddim = {"sde": {"kind": "ddim"}} if family == "sd" else {}  # the UNet family's dynamics
    opts = options(family, path=base, lora_rank=2, lora_alpha=3.0, **ddim)
    policy = DiffusionPolicy(load_adapter(opts), opts)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.adapter.denoiser.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    return export_policy(policy, out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_starts_from_a_diffusers_lora_fused_as_diffusers_fuses_it(tmp_path, family):
    """policy.options.init_lora on each family: the denoiser equals what diffusers makes of the same LoRA file on
    the base pipeline (load_lora_weights, fuse_lora, unload_lora_weights), so a LoRA trained elsewhere starts the
    run as diffusers would run it (the LoRA: :func:`random_lora`)."""
    from diffusers import DiffusionPipeline

    base = FAMILIES[family][0](tmp_path / "base", seed=0)
    lora = random_lora(family, base, tmp_path / "lora")
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    expected = (getattr(pipe, "transformer", None) or pipe.unet).state_dict()
    plain = load_adapter(options(family, path=base)).denoiser.state_dict()
    got = load_adapter(options(family, path=base, init_lora=str(lora))).denoiser.state_dict()
    assert got.keys() == expected.keys() == plain.keys()
    worst = max((got[k].float() - expected[k].float()).abs().max().item() for k in got)
    moved = max((got[k].float() - plain[k].float()).abs().max().item() for k in got)
    assert worst < 1e-6 < 1e-3 < moved, (worst, moved)
    single = tmp_path / "style.safetensors"  # one file, as LoRAs are shared: the same merge
    single.write_bytes((lora / "pytorch_lora_weights.safetensors").read_bytes())
    again = load_adapter(options(family, path=base, init_lora=str(single))).denoiser.state_dict()
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_an_init_lora_the_policy_cannot_hold_is_refused(tmp_path):
    """A Wan 2.2 pair of experts takes no single LoRA; a LoRA that also adapts the text encoders would have lost that
    part silently (the policy fuses the denoiser's)."""
    lora = tmp_path / "lora"
    lora.mkdir()
    zero = torch.zeros(2, 16)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": zero.clone(),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": zero},
              lora / "pytorch_lora_weights.safetensors")  # fmt: skip
    with pytest.raises(UserError, match=r"also adapts text_encoder \(keys text_encoder\.\*\), which the policy"):
        load_adapter(options("sd3", path=save_tiny_sd3(tmp_path / "sd3"), init_lora=str(lora)))
    (tmp_path / "style.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"init_lora='.*style.pt' is not a .safetensors file; a pickled LoRA"):
        load_adapter(options("sd3", path=save_tiny_sd3(tmp_path / "sd3b"), init_lora=str(tmp_path / "style.pt")))
    base = save_tiny_wan(tmp_path / "wan22", two_experts=True)
    with pytest.raises(UserError, match=r"init_lora: WanPipeline cannot load a LoRA into this denoiser here"):
        load_adapter(options("wan", path=base, init_lora=str(lora)))


def test_a_kohya_layout_lora_file_starts_the_run_as_its_diffusers_layout_does(tmp_path):
    """LoRAs are mostly shared as one file in kohya's layout (lora_unet_..._to_q.lora_down.weight, .lora_up.weight,
    .alpha); the pipeline class's lora_state_dict converts it, so it merges exactly as the same adapter in diffusers'
    layout (here written from that one: modules' dots become underscores, A / B become down / up, alpha 3)."""
    base = save_tiny_sd(tmp_path / "base")
    lora = random_lora("sd", base, tmp_path / "lora")
    kohya = {}
    for key, value in load_file(str(lora / "pytorch_lora_weights.safetensors")).items():
        module, _, which = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(3.0)
    save_file(kohya, tmp_path / "style.safetensors")
    by_diffusers = load_adapter(options("sd", path=base, init_lora=str(lora))).denoiser.state_dict()
    by_kohya = load_adapter(options("sd", path=base, init_lora=str(tmp_path / "style.safetensors"))).denoiser
    plain = load_adapter(options("sd", path=base)).denoiser.state_dict()
    got = by_kohya.state_dict()
    assert all(torch.equal(got[k], by_diffusers[k]) for k in got)
    assert max((got[k] - plain[k]).abs().max().item() for k in got) > 1e-3


def test_a_lora_folder_or_hub_repository_with_one_safetensors_file_of_another_name_is_read(tmp_path):
    """LoRA repositories on the hub mostly hold one file of their own name (style_lora.safetensors), which diffusers'
    load_lora_weights takes; init_lora read only pytorch_lora_weights.safetensors ("the folder holds nothing")."""
    base = save_tiny_sd3(tmp_path / "base")
    lora = random_lora("sd3", base, tmp_path / "lora")
    named = tmp_path / "named"
    named.mkdir()
    (named / "style_lora.safetensors").write_bytes((lora / "pytorch_lora_weights.safetensors").read_bytes())
    want = load_adapter(options(path=base, init_lora=str(lora))).denoiser.state_dict()
    with offline_hub(tmp_path / "hub") as cache:
        add_snapshot(cache, "someone/style-lora", named)
        for init in (str(named), "someone/style-lora"):
            got = load_adapter(options(path=base, init_lora=init)).denoiser.state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want), init
    (named / "other.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds 2 .safetensors files \(other.safetensors, style_lora.safetensors\)"):
        load_adapter(options(path=base, init_lora=str(named)))
