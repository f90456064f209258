"""The Llama-family decoder and its Hugging Face interop."""

from kd_jax.models.decoder import Decoder, DecoderConfig, init_decoder, num_params
from kd_jax.models.hf import HFFormatError, config_from_hf, config_to_hf, load_hf, save_hf
from kd_jax.models.source import build_model, keep_layers

__all__ = ["Decoder", "DecoderConfig", "HFFormatError", "build_model", "config_from_hf", "config_to_hf",
           "init_decoder", "keep_layers", "load_hf", "num_params", "save_hf"]
