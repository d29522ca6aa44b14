"""Weights are read from safetensors only: a folder with pickled ``.bin`` weights is refused, naming the folder and
the conversion; the conversion it prints works."""

import re
import subprocess
import sys

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.safe_weights import pickle_only_folders
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.vlm import VLMPolicyOptions, load_vlm
from mmgrpo.testing.tiny_sd import tiny_sd_pipeline
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl


def test_a_diffusers_folder_with_pickle_weights_is_refused_and_the_printed_conversion_works(tmp_path):
    path = tmp_path / "sd_bin"
    tiny_sd_pipeline(0).save_pretrained(str(path), safe_serialization=False)
    assert (path / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert {p.name for p in pickle_only_folders(path)} >= {"unet", "vae"}  # (transformers 5 writes safetensors)
    with pytest.raises(UserError) as e:
        load_adapter(GeneratorPolicyOptions(family="sd", path=str(path)))
    msg = str(e.value)
    assert f"policy.options.path='{path}'" in msg and str(path / "unet") in msg and "only pickled weights" in msg
    command = re.search(r'python -c "(.*?)"', msg).group(1)
    assert "from_pretrained(" in command and "safe_serialization=True" in command
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True)  # what the user runs once
    adapter = load_adapter(GeneratorPolicyOptions(family="sd", path=f"{path}-safetensors"))
    assert adapter is not None


def test_a_vlm_folder_with_pickle_weights_is_refused(tmp_path):
    model, processor = tiny_qwen2_vl(0)
    save_tiny(model, processor, tmp_path / "vlm")
    (tmp_path / "vlm" / "model.safetensors").unlink()  # transformers 5 always writes safetensors: make the old layout
    torch.save(model.state_dict(), tmp_path / "vlm" / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"policy.options.path='.*vlm': .* only pickled weights.*"
                                        r"Qwen2VLForConditionalGeneration.from_pretrained"):  # fmt: skip
        load_vlm(str(tmp_path / "vlm"), VLMPolicyOptions(path=str(tmp_path / "vlm")))


def test_torch_load_is_only_used_with_weights_only():
    from pathlib import Path

    root = Path(__file__).parents[2]
    for p in [*root.joinpath("mmgrpo").rglob("*.py"), *root.joinpath("bench").rglob("*.py")]:
        for line in p.read_text().splitlines():
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"')):
                assert "weights_only=True" in line, f"{p}: {line.strip()}"
