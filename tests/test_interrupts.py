"""A KeyboardInterrupt at any step of adding or removing hooks, during a run, leaves no hook on
any module and the grad mode as it was: the clean-up finishes before the interrupt is raised,
and hooks torch holds but TransformerLens never recorded are removed too."""

import pytest
import torch
import transformer_lens.hook_points as hook_points
from torch.utils.hooks import RemovableHandle

import clip_lens
from clip_lens import tiny

MODEL = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
TOKENS = MODEL.to_tokens(["There is a red circle."])
IMAGE = torch.zeros(1, 3, 64, 64)
RUNS = {
    "run_with_cache": lambda: MODEL.run_with_cache(text=TOKENS, image=IMAGE),
    "tower run_with_hooks": lambda: MODEL.vision.run_with_hooks(
        IMAGE, fwd_hooks=[("blocks.1.attn.hook_pattern", clip_lens.value_only_attention)]),
    "patch value_only": lambda: clip_lens.patch(MODEL, target=IMAGE, text=TOKENS, hook="pattern",
                                                intervention="value_only", layers=[0, (1, 2)], progress=False),
    "patch attribution": lambda: clip_lens.patch(MODEL, target=TOKENS, image=IMAGE, intervention="zero",
                                                 method="attribution", layers=[1, 2], progress=False),
    "incl_bwd": lambda: MODEL.text.run_with_cache(TOKENS, incl_bwd=True, metric=lambda emb: emb.sum()),
}
# the two steps an interrupt can split: torch registering a hook before TransformerLens records its
# handle, and each handle's removal
STEPS = {"add": (hook_points.LensHandle, "__init__"), "remove": (RemovableHandle, "remove")}


def _hooks_left() -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in MODEL.modules())


def _calls(run, step) -> int:
    owner, name = STEPS[step]
    original, count = getattr(owner, name), [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        run()
    finally:
        setattr(owner, name, original)
    return count[0]


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("run", list(RUNS))
def test_an_interrupt_at_every_hook_step_leaves_the_model_clean(run, step):
    owner, name = STEPS[step]
    original = getattr(owner, name)
    total = _calls(RUNS[run], step)
    assert total > 0
    for k in range(1, total + 1):
        count = [0]

        def interrupted(*args, k=k, **kwargs):
            count[0] += 1
            if count[0] == k:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        grad = torch.is_grad_enabled()
        setattr(owner, name, interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                RUNS[run]()
        finally:
            setattr(owner, name, original)
        assert _hooks_left() == 0, f"hooks left after an interrupt at {step} call {k} of {total}"
        assert torch.is_grad_enabled() == grad
        assert MODEL.context_level == 0
    MODEL.zero_grad(set_to_none=True)
