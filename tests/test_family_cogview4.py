"""CogView4 LoRA layouts against diffusers + PEFT (float32, tiny CogView4: one block).

Its community publishes diffusers/PEFT files (`transformer.`: diffusers' and finetrainers'
trainers); diffusers reads them. An unprefixed file diffusers loads as nothing (checked):
compared with diffusers on the same keys prefixed.
"""

from peft_layouts import check_peft, check_unmatched, check_unprefixed

FAMILY = "cogview4"


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, must=("time_condition_embed.condition_embedder.linear_1", "transformer_blocks.0.norm1.linear",
                             "patch_embed.text_proj"))


def test_unprefixed_file_is_the_transformers():
    check_unprefixed(FAMILY)


def test_unmatched_key_raises_naming_it():
    check_unmatched(FAMILY, "transformer_blocks.0.attn1.to_qq", (4, 16), (16, 4))
