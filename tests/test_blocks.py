"""Block pinning for every family: what a block is (runtime/blocks.BLOCK_LISTS), counts read
from key names, the first-N selection in forward order, and the messages for bad counts."""
import pytest
import torch.nn as nn

from vbar_loaders.loaders.runtime.blocks import (block_lists, check_pins, count_blocks,
                                                  first_blocks, pin_blocks)


def keys(*groups):
    """['<list>.<i>.x.weight' ...] for (list, count) groups, plus distractors every family has."""
    out = ["img_in.weight", "final_layer.linear.weight"]
    for name, n in groups:
        out += [f"{name}.{i}.attn.qkv.weight" for i in range(n)]
    return out


# Family -> its keys (real list names, counts small) -> expected lists in forward order.
FAMILIES = {
    "flux": (keys(("double_blocks", 3), ("single_blocks", 5)),
             [("double_blocks", 3), ("single_blocks", 5)]),
    "hunyuan_video": (keys(("double_blocks", 2), ("single_blocks", 1))
                      + ["txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight",
                         "txt_in.individual_token_refiner.blocks.1.mlp.fc1.weight"],
                      [("double_blocks", 2), ("single_blocks", 1)]),
    "hidream": (keys(("double_stream_blocks", 2), ("single_stream_blocks", 4)),
                [("double_stream_blocks", 2), ("single_stream_blocks", 4)]),
    "sd3": (keys(("joint_blocks", 4)), [("joint_blocks", 4)]),
    "qwen_image": (keys(("transformer_blocks", 2)), [("transformer_blocks", 2)]),
    "wan": (keys(("blocks", 3)) + ["text_embedding.0.weight", "head.head.weight"], [("blocks", 3)]),
    "sdxl": (keys(("input_blocks", 9), ("output_blocks", 9)) + ["middle_block.0.in_layers.0.weight"],
             [("input_blocks", 9), ("output_blocks", 9)]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_block_lists_per_family(family):
    names, want = FAMILIES[family]
    assert block_lists(names) == want
    # checkpoint keys carry ComfyUI's prefix: same answer
    assert block_lists("model.diffusion_model." + k for k in names) == want


def test_no_blocks_and_gaps():
    assert block_lists(["img_in.weight", "vae.decoder.up.0.x"]) == []
    # ComfyUI counts up to the first gap
    assert block_lists(["blocks.0.a", "blocks.1.a", "blocks.3.a"]) == [("blocks", 2)]


def test_first_blocks_fill_lists_in_forward_order():
    lists = [("double_blocks", 3), ("single_blocks", 5)]
    assert first_blocks(lists, 0) == {"double_blocks": 0, "single_blocks": 0}
    assert first_blocks(lists, 2) == {"double_blocks": 2, "single_blocks": 0}
    assert first_blocks(lists, 5) == {"double_blocks": 3, "single_blocks": 2}
    assert first_blocks(lists, 8) == {"double_blocks": 3, "single_blocks": 5}


def test_counts_above_the_file_are_refused_naming_the_counts():
    names = FAMILIES["wan"][0]
    check_pins(names, first=0, what="wan.gguf")
    check_pins(names, first=3, what="wan.gguf")
    with pytest.raises(ValueError, match=r"wan\.gguf has 3 repeated blocks \(blocks: 3\), "
                                         r"so blocks_cuda_size "
                                         r"can be 0\.\.3; got 4"):
        check_pins(names, first=4, what="wan.gguf")
    with pytest.raises(ValueError, match="0..3; got -1"):
        check_pins(names, first=-1, what="wan.gguf")
    flux = FAMILIES["flux"][0]
    with pytest.raises(ValueError,
                       match=r"8 repeated blocks \(double_blocks: 3, single_blocks: 5\).*0\.\.8; got 9"):
        check_pins(flux, first=9, what="flux.gguf")
    with pytest.raises(ValueError, match="not both"):
        check_pins(flux, double=1, first=1, what="flux.gguf")
    with pytest.raises(ValueError, match="double_blocks_cuda_size can be 0..3"):
        check_pins(flux, double=4, what="flux.gguf")
    with pytest.raises(ValueError, match="no repeated blocks, so blocks_cuda_size can be 0..0"):
        check_pins(["x.weight"], first=1, what="odd.gguf")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))


class Dual(nn.Module):
    """double then single blocks, plus a nested 'blocks' list that is not a top-level block."""

    def __init__(self):
        super().__init__()
        self.img_in = nn.Linear(4, 4)
        self.double_blocks = nn.ModuleList([Block() for _ in range(2)])
        self.single_blocks = nn.ModuleList([Block() for _ in range(3)])
        self.refiner = nn.Module()
        self.refiner.blocks = nn.ModuleList([Block()])


def held(model):
    return sorted(n for n, m in model.named_modules() if getattr(m, "vbar_hold", False)
                  and isinstance(m, nn.Linear))


@pytest.mark.parametrize("first,want", [
    (0, []),
    (1, ["double_blocks.0"]),
    (3, ["double_blocks.0", "double_blocks.1", "single_blocks.0"]),
    (5, ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1",
         "single_blocks.2"]),
])
def test_pin_first_blocks_marks_their_layers_only(first, want):
    model = Dual()
    pin_blocks(model, 0, 0, what="dual", first=first)
    expect = sorted(f"{b}.{layer}" for b in want for layer in ("attn", "mlp.0", "mlp.1"))
    assert held(model) == expect


def test_flux_inputs_still_pin_double_and_single():
    model = Dual()
    pin_blocks(model, 1, 2, what="dual")
    assert held(model) == sorted(f"{b}.{layer}" for b in
                                 ("double_blocks.0", "single_blocks.0", "single_blocks.1")
                                 for layer in ("attn", "mlp.0", "mlp.1"))
    assert count_blocks(n for n, _ in model.named_modules()) == (2, 3)
    with pytest.raises(ValueError, match=r"dual has 5 repeated blocks \(double_blocks: 2"):
        pin_blocks(Dual(), 0, 0, what="dual", first=6)
