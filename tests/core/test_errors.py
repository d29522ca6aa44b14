"""mmgrpo.core.errors: what an allocation failure looks like, and the part of torch's message a paragraph quotes."""

import torch

from mmgrpo.core.errors import first_line, out_of_memory

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
