"""Test-only ComfyUI node (never shipped with the pack): seeded random conditioning of a given shape.

The tiny model families (tests/tiny_families.py) keep their real text widths (Wan's umt5 4096,
Qwen-Image's 3584, ...) but their stock text encoders are billions of parameters, so the tests
feed conditioning directly. Unlike the harness's helper, this one can attach the attention mask
that LTX-Video's model reads from its T5 conditioning.
"""
import torch


class VBARTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 16, "min": 1, "max": 8192}),
            "dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 16384, "tooltip": "0 = no pooled_output"}),
            "attention_mask": ("BOOLEAN", {"default": False, "tooltip": "attach an all-ones mask"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "vbar_tests"

    def make(self, tokens, dim, pooled_dim, attention_mask, seed):
        g = torch.Generator().manual_seed(seed)
        extra = {}
        cond = torch.randn((1, tokens, dim), generator=g)
        if pooled_dim:
            extra["pooled_output"] = torch.randn((1, pooled_dim), generator=g)
        if attention_mask:
            extra["attention_mask"] = torch.ones((1, tokens), dtype=torch.long)
        return ([[cond, extra]],)


NODE_CLASS_MAPPINGS = {"VBARTestConditioning": VBARTestConditioning}
