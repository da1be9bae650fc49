"""The GPU check script (benchmarks/gpu_check.py): its small CPU version runs in the suite, so the
script stays ready for a GPU; the same checks run under pytest where CUDA is present (marker
`gpu`), and are skipped with the reason otherwise."""

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def _run(tmp_path, *args):
    out = tmp_path / "figures.json"
    status = gpu_check.main([*args, "--json", str(out)])
    return status, json.loads(out.read_text())


@contextlib.contextmanager
def tf32_flags(matmul: bool, cudnn: bool):
    """Set torch's two TF32 flags for the block and put back what they were, by plain assignment:
    torch's backend modules refuse `delattr`, which is how some test tools undo a `setattr`."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_flags_are_set_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_flags(not before[0], not before[1]):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not before[0], not before[1])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_the_small_check_runs_on_the_cpu_and_passes(tmp_path):
    with tf32_flags(True, True):  # a user's setting ...
        status, figures = _run(tmp_path, "--device", "cpu", "--small")
        # ... is theirs again after the check
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert figures["tf32"] is False
    assert status == 0, figures["failures"]
    assert figures["parity"]["float32"] < 1e-4
    assert len(figures["hook_loops"]) >= 8 and max(figures["hook_loops"].values()) < 1e-4
    # bfloat16 is close to float32, but not equal: the comparison measured something
    assert 0 < figures["parity"]["bfloat16_vs_float32"] < 0.1 * figures["parity"]["embedding_scale"]
    assert figures["image_ablation"]["iae_max_abs_error_bf16"] > 0
    # the grid's rate is its FLOPs over its time, set against the GEMM rate measured in the same run
    grid = figures["patching"]
    assert grid["grid_tflops_float32"] == pytest.approx(grid["grid_tflop"] / grid["all_pairs_s"])
    assert grid["grid_bf16_speedup"] == pytest.approx(grid["grid_tflops_bfloat16"] / grid["grid_tflops_float32"])
    for dtype in ("float32", "bfloat16"):
        assert grid[f"grid_over_gemm_{dtype}"] == pytest.approx(grid[f"grid_tflops_{dtype}"] / grid[f"gemm_tflops_{dtype}"])
        assert 0 < grid[f"grid_over_gemm_{dtype}"] < 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check needs one")
def test_the_gpu_check_passes_on_cuda(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    status, figures = _run(tmp_path, "--device", "cuda", "--small")
    assert status == 0, figures["failures"]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
