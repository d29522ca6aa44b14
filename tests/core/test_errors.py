"""mmgrpo.core.errors: what an allocation failure looks like, and the part of torch's message a paragraph quotes."""

import torch

from mmgrpo.core.errors import UserError, as_shown, first_line, out_of_memory

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is "
    "free. Including non-PyTorch memory, this process has 77.88 GiB memory in use. Of the allocated memory 75.1 GiB "
    "is allocated by PyTorch. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"
)


def test_out_of_memory_knows_cuda_and_the_cpu_allocator():
    assert out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    try:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's own failure, not a stand-in
    except RuntimeError as e:
        assert out_of_memory(e), e
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("can't allocate memory"))


def test_first_line_ends_at_a_sentence_within_the_limit():
    assert first_line(torch.OutOfMemoryError(CUDA_OOM)) == (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB "
        "is free. ..."
    )
    assert first_line(RuntimeError("short\nsecond line")) == "short"
    assert first_line(RuntimeError("x" * 300)) == "x" * 160 + "..."  # no sentence end: cut at the limit
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_as_shown_wraps_the_paragraph_and_keeps_the_lines_a_yaml_error_points_at(tmp_path):
    from mmgrpo.train.config import load_config

    (tmp_path / "x.yaml").write_text("pipeline: bandit\ntrainer:\n  lr: [3e-4\n  max_steps: 2\n")
    try:
        load_config(tmp_path / "x.yaml")
    except UserError as e:
        shown = as_shown(e)
    *paragraph, a, b, c, d = shown.split("\n")
    assert (
        len(paragraph) > 1
        and all(len(line) <= 100 for line in paragraph)
        and " ".join(paragraph).startswith("config file ")
    )
    assert [a, b, c, d] == ["  3 |   lr: [3e-4", "    |       ^", "  4 |   max_steps: 2", "    |            ^"]
    assert as_shown(UserError("one " * 40), width=60).count("\n") == 2  # a plain message: the paragraph, wrapped
