"""AuraFlow LoRA layouts against diffusers + PEFT (float32, tiny AuraFlow: one MMDiT and one DiT block).

Its community publishes diffusers/PEFT files (`transformer.`: diffusers' and SimpleTuner's
trainers; ComfyUI reads AuraFlow LoRAs in no other layout); diffusers reads them. An unprefixed
file diffusers loads as nothing (checked): compared with diffusers on the same keys prefixed.
"""

from peft_layouts import check_peft, check_unmatched, check_unprefixed

FAMILY = "auraflow"


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, must=("single_transformer_blocks.0.ff.out_projection", "ff_context.out_projection",
                             "time_step_proj.linear_1"))


def test_unprefixed_file_is_the_transformers():
    check_unprefixed(FAMILY)


def test_unmatched_key_raises_naming_it():
    check_unmatched(FAMILY, "joint_transformer_blocks.0.attn.to_qq", (4, 16), (16, 4))
