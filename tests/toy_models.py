"""Settings of the toy models the tests share: random-init, seconds to build and to train on a CPU."""

#: ``create_model("pathsam2", **TINY_PATHSAM2)``: a toy Path-SAM2 on 64 px tiles.
TINY_PATHSAM2 = dict(
    encoder="hiera_micro",
    uni=None,
    image_size=64,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=64,
    freeze_encoders=False,
)
