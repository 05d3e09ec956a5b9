"""tests/test_family_exports.py's tests for the video families (a module of their own, for `--dist loadfile`)."""

from test_family_exports import (export_fixture, test_engine_pipeline_makes_the_picture_diffusers_makes,  # noqa: F401
                                 test_generate_writes_the_picture_or_video,
                                 test_every_component_exported_and_equal_to_the_fused_model,
                                 test_refit_to_another_adapter_is_a_fresh_export, test_triton_configs_parse,
                                 test_video_denoisers_at_two_frame_counts,
                                 test_video_vae_decodes_as_diffusers_over_several_chunks)

family_export = export_fixture(["cogvideox", "mochi", "ltx-video", "hunyuan-video", "skyreels-v2", "kandinsky"])
