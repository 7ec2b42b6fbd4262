"""engine/runtime_choice.py: device, dtype, attention and quantization choices, and freeing memory.

Run on this CPU machine for real; CUDA / MPS availability is monkeypatched only where the function merely asks
torch whether the hardware is there (nothing runs on it). bitsandbytes is CUDA-only and absent here: where the
quantization config is built past the "is it installed" check, an empty stand-in package is put on sys.path.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref

import pytest
import torch
from transformers import BitsAndBytesConfig

from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.engine import runtime_choice as rc

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def hw():
    """A monkeypatch undone when the test ends (before conftest's teardown releases the model manager, which
    itself asks torch for CUDA / MPS: it must see the real answers again)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _gpus(mp, cuda: bool, mps: bool) -> None:
    mp.setattr(torch.cuda, "is_available", lambda: cuda)
    mp.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.fixture
def no_gpu(hw):
    _gpus(hw, False, False)
    return hw


@pytest.fixture
def with_cuda(hw):
    _gpus(hw, True, False)
    return hw


@pytest.fixture
def with_mps(hw):
    _gpus(hw, False, True)
    return hw


# ----------------------------------------------------------------------------------------------------------
# Device
# ----------------------------------------------------------------------------------------------------------


def test_this_machine_resolves_auto_to_the_cpu():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    assert rc.resolve_device("auto") == CPU
    assert rc.resolve_device("cpu") == CPU


def test_auto_prefers_cuda_then_mps_then_cpu(hw):
    _gpus(hw, cuda=False, mps=False)
    assert rc.resolve_device("auto") == CPU
    _gpus(hw, cuda=False, mps=True)
    assert rc.resolve_device("auto") == MPS
    _gpus(hw, cuda=True, mps=True)
    assert rc.resolve_device("auto") == CUDA  # CUDA wins over MPS


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_chosen_without_cuda_is_refused_with_the_fix(no_gpu, device):
    with pytest.raises(QwenVLError) as err:
        rc.resolve_device(device)
    assert str(err.value) == ("device 'cuda' was chosen but this PyTorch sees no CUDA GPU: choose 'auto' or "
                              "'cpu'.")


def test_cuda_chosen_with_cuda_keeps_the_index(with_cuda):
    assert rc.resolve_device("cuda") == CUDA
    assert rc.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert rc.resolve_device("cpu") == CPU  # an explicit CPU stays on the CPU


def test_mps_chosen_without_mps_is_refused(no_gpu):
    with pytest.raises(QwenVLError, match=r"^device 'mps' was chosen but MPS is not available: choose 'auto' or"):
        rc.resolve_device("mps")


def test_mps_chosen_with_mps(with_mps):
    assert rc.resolve_device("mps") == MPS


def test_every_offered_device_choice_resolves(hw):
    _gpus(hw, cuda=True, mps=True)
    assert [rc.resolve_device(d).type for d in rc.DEVICE_CHOICES] == ["cuda", "cuda", "cpu", "mps"]


# ----------------------------------------------------------------------------------------------------------
# Dtype
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CPU, CUDA, MPS])
def test_explicit_dtypes_are_kept_on_every_device(device):
    assert rc.resolve_dtype("bf16", device) is torch.bfloat16
    assert rc.resolve_dtype("fp16", device) is torch.float16
    assert rc.resolve_dtype("fp32", device) is torch.float32


def test_auto_dtype_per_device(hw):
    assert rc.resolve_dtype("auto", CPU) is torch.float32
    assert rc.resolve_dtype("auto", MPS) is torch.float16
    hw.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert rc.resolve_dtype("auto", CUDA) is torch.bfloat16
    hw.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a Turing GPU
    assert rc.resolve_dtype("auto", CUDA) is torch.float16


@pytest.mark.parametrize("dtype", ["int8", "float32", "BF16", ""])
def test_an_unknown_dtype_is_refused_with_the_choices(dtype):
    with pytest.raises(QwenVLError) as err:
        rc.resolve_dtype(dtype, CPU)
    assert str(err.value) == f"Unknown dtype '{dtype}': choose one of auto, bf16, fp16, fp32."


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_the_cpu(dtype):
    assert rc.flash_attention_usable(CPU, dtype) == (False, "flash-attn needs a CUDA GPU")
    assert rc.resolve_attention("auto", CPU, dtype) == "sdpa"
    assert rc.resolve_attention("sdpa", CPU, dtype) == "sdpa"
    assert rc.resolve_attention("eager", CPU, dtype) == "eager"
    with pytest.raises(QwenVLError) as err:
        rc.resolve_attention("flash_attention_2", CPU, dtype)
    assert str(err.value) == ("attention_mode 'flash_attention_2' is not usable here: flash-attn needs a CUDA GPU. "
                              "Choose 'auto' or 'sdpa'.")


def test_attention_on_cuda_without_flash_attn_installed():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    assert rc.flash_attention_usable(CUDA, torch.bfloat16) == (False, "flash-attn is not installed")
    assert rc.resolve_attention("auto", CUDA, torch.bfloat16) == "sdpa"
    with pytest.raises(QwenVLError, match="not usable here: flash-attn is not installed. Choose 'auto' or 'sdpa'."):
        rc.resolve_attention("flash_attention_2", CUDA, torch.bfloat16)


@pytest.mark.parametrize("mode", ["flash_attention_3", "SDPA", "", "flex"])
def test_an_unknown_attention_mode_is_refused(mode):
    with pytest.raises(QwenVLError) as err:
        rc.resolve_attention(mode, CPU, torch.float32)
    assert str(err.value) == (f"Unknown attention_mode '{mode}': choose one of auto, sdpa, flash_attention_2, "
                              "eager.")


# ----------------------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def bitsandbytes_stand_in(tmp_path, hw):
    """An importable (empty) ``bitsandbytes`` package: what find_spec looks for. Nothing may import it."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        yield  # the real one
        return
    (tmp_path / "bnb" / "bitsandbytes").mkdir(parents=True)
    (tmp_path / "bnb" / "bitsandbytes" / "__init__.py").write_text("")
    hw.syspath_prepend(str(tmp_path / "bnb"))
    assert importlib.util.find_spec("bitsandbytes") is not None
    yield
    assert "bitsandbytes" not in sys.modules


@pytest.mark.parametrize("none", ["none", "", None])
def test_no_quantization_is_no_config(none):
    assert rc.quantization_config(none, CPU, torch.float32) is None
    assert rc.quantization_config(none, CUDA, torch.bfloat16) is None


@pytest.mark.parametrize("quantization", ["4-bit", "8-bit"])
@pytest.mark.parametrize("device", [CPU, MPS])
def test_quantization_off_cuda_is_refused_with_the_fix(quantization, device):
    with pytest.raises(QwenVLError) as err:
        rc.quantization_config(quantization, device, torch.float32)
    assert str(err.value) == (f"quantization '{quantization}' uses bitsandbytes, which needs a CUDA GPU; this run is "
                              f"on {device.type}. Choose quantization 'none'.")


@pytest.mark.parametrize("quantization", ["2-bit", "int8", "4bit"])
def test_an_unknown_quantization_is_refused_before_the_device(quantization):
    with pytest.raises(QwenVLError) as err:
        rc.quantization_config(quantization, CPU, torch.float32)
    assert str(err.value) == f"Unknown quantization '{quantization}': choose one of none, 8-bit, 4-bit."


def test_quantization_on_cuda_without_bitsandbytes_says_how_to_install_it():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(QwenVLError) as err:
        rc.quantization_config("4-bit", CUDA, torch.bfloat16)
    assert str(err.value) == ("quantization '4-bit' needs bitsandbytes: pip install bitsandbytes (or choose "
                              "'none').")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4_bit_config_is_nf4_double_quant_computing_in_the_model_dtype(bitsandbytes_stand_in, dtype):
    config = rc.quantization_config("4-bit", CUDA, dtype)
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit is True and config.load_in_8bit is False
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == dtype
    assert config.bnb_4bit_use_double_quant is True
    assert config.llm_int8_skip_modules == ["visual", "lm_head"]  # the vision tower and head stay unquantized


def test_8_bit_config_skips_the_vision_tower_and_head(bitsandbytes_stand_in):
    config = rc.quantization_config("8-bit", CUDA, torch.bfloat16)
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_8bit is True and config.load_in_4bit is False
    assert config.llm_int8_skip_modules == ["visual", "lm_head"]


# ----------------------------------------------------------------------------------------------------------
# release_memory
# ----------------------------------------------------------------------------------------------------------


class _Holder:
    def __init__(self) -> None:
        self.tensor = torch.zeros(1024)
        self.me = self  # a reference cycle: only the garbage collector frees it


def test_release_memory_collects_unreachable_cycles(no_gpu):
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # nothing else may collect the cycle before release_memory does
    try:
        holder = _Holder()
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None
        rc.release_memory()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()


def test_release_memory_empties_the_cache_of_the_accelerator_there_is(hw):
    calls = []
    hw.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    hw.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))

    _gpus(hw, cuda=False, mps=False)
    rc.release_memory()
    assert calls == []  # nothing to empty on a CPU-only machine

    _gpus(hw, cuda=True, mps=False)
    rc.release_memory(CUDA)
    assert calls == ["cuda"]

    calls.clear()
    _gpus(hw, cuda=False, mps=True)
    rc.release_memory(MPS)
    assert calls == ["mps"]
