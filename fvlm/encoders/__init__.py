"""The shared encoder abstraction: one ViT for 2D and 3D, and the text encoder.

>>> from fvlm.encoders import create_encoder, list_encoders
>>> enc = create_encoder("vit3d_tiny", img_size=(64, 64, 32), patch_size=(16, 16, 8))
"""
from .registry import SIZES, create_encoder, encoder_defaults, list_encoders, register_encoder
from .vit import VisionTransformer, patch_regions, patch_to_pixel_mask, patchify, sincos_pos_embed, unpatchify
from .weights import LoadReport, inflate_patch_kernel, load_encoder_weights, read_torch_file


def __getattr__(name):  # TextEncoder pulls in transformers: import it lazily
    if name == "TextEncoder":
        from .text import TextEncoder

        return TextEncoder
    raise AttributeError(name)


__all__ = ["SIZES", "create_encoder", "encoder_defaults", "list_encoders", "register_encoder",
           "VisionTransformer", "patchify", "unpatchify", "patch_regions", "patch_to_pixel_mask", "sincos_pos_embed", "LoadReport",
           "inflate_patch_kernel", "load_encoder_weights", "read_torch_file", "TextEncoder"]
