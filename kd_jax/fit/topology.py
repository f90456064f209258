"""TPU slices and GPU hosts as compile targets on any machine: `--topology v5e:4x8` for the dry run.

With libtpu installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies.get_topology_desc`
gives a slice's chips as devices the real XLA TPU compiler compiles for, ahead of time, on a CPU
(as MaxText's train_compile.py does); with the CUDA PJRT plugin (`pip install -e '.[cuda]'`, no CUDA
libraries), `h100:8` gives compile-only H100s the same way. The compiled program's `memory_analysis()` is what a chip
would hold and `cost_analysis()` the FLOPs and HBM bytes the compiler counts; `roofline` turns
those into a floor of the step time. Both are the compiler's accounting, not a measured speed.

CHIPS: per-chip HBM, dense bf16 peak and HBM bandwidth from Google Cloud's TPU pages and NVIDIA's
H100 SXM data sheet (2026-12); the peak is kd_jax/models/flops.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile

from kd_jax.base.errors import KDJaxError
from kd_jax.models.flops import peak_flops_of_kind


class TopologyError(KDJaxError, ValueError):
    """A --topology that cannot be compiled for, with what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the topology prefix: "v5e"
    device_kind: str  # jax's device_kind of its devices
    hbm_gib: float
    hbm_bytes_per_s: float
    form: str  # the shape --topology takes after "CHIP:": "AxB" (a 2-D slice), "AxBxC" (3-D), "N or HOSTSxN" (GPUs)
    platform: str = "tpu"

    @property
    def peak_flops(self) -> float:
        return peak_flops_of_kind(self.device_kind)


# v5e and v6e slices are 2-D meshes of chips (AxB), v5p slices 3-D tori (AxBxC), as Cloud TPU names
# them: libtpu describes a v5e:4x8x2 but its compiler aborts the process on it (chip_bounds().z == 1).
CHIPS = {c.name: c for c in (
    Chip("v5e", "TPU v5 lite", 16, 819e9, "AxB"),
    Chip("v5p", "TPU v5", 95, 2765e9, "AxBxC"),
    Chip("v6e", "TPU v6 lite", 32, 1640e9, "AxB"),
    Chip("h100", "NVIDIA H100 80GB HBM3", 84978434048 / 2**30, 3.35e12, "N or HOSTSxN", "gpu"),  # SXM
)}
# a form -> (how many numbers it takes, what they are)
_AXES = {"AxB": ((2,), "a 2-D slice"), "AxBxC": ((3,), "a 3-D slice"), "N or HOSTSxN": ((1, 2), "GPUs per host")}
_EXAMPLE = {"v5e": "v5e:4x8 (a v5e-32)", "v5p": "v5p:2x2x2", "v6e": "v6e:4x8", "h100": "h100:8 or h100:2x8"}
_NAME = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)*)$")

# The H100 SXM as XLA's GPU compiler sees it (a GpuTargetConfig text proto, after XLA's
# h100_sxm.txtpb): with it the CUDA PJRT plugin makes compile-only devices, no GPU or CUDA needed.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 3 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_HOST = (2, 2, 1)  # chips per host the slice is described with (the compile does not depend on it)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # "v5e:4x8"
    chip: Chip
    dims: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def host(self) -> tuple[int, ...]:
        """Chips per host along each axis, as the slice is described (`_HOST`, within the slice; a GPU
        host holds the last number of h100:HOSTSxN)."""
        if self.chip.platform == "gpu":
            return (self.dims[-1],)
        dims = self.dims + (1,) * (3 - len(self.dims))
        return tuple(min(h, d) for h, d in zip(_HOST, dims))

    @property
    def host_chips(self) -> int:
        return math.prod(self.host)


def parse(name: str) -> Topology:
    """`v5e:4x8` (TPU chips along the slice's axes), `h100:8` / `h100:2x8` (hosts x GPUs) -> Topology;
    a clear error otherwise: an unknown chip lists the supported ones, a shape the chip does not take
    (`v5e:4x8x2`, `v5p:2x2`) names its form, a 0 is refused (nothing to compile for)."""
    text = name.strip()
    m = _NAME.match(text)
    if not m or m.group(1) not in CHIPS:
        raise TopologyError(f"--topology {name!r}: expected CHIP:AxB (v5e, v6e) or CHIP:AxBxC (v5p), e.g. "
                            f"v5e:4x8 (a v5e-32) or v5p:2x2x2, or h100:N / h100:HOSTSxN (GPUs per host); "
                            f"supported chips: {', '.join(CHIPS)}")
    chip, dims = CHIPS[m.group(1)], tuple(int(d) for d in m.group(2).split("x"))
    axes, what = _AXES[chip.form]
    if len(dims) not in axes:
        forms = " or ".join(f"{chip.name}:{form}" for form in chip.form.split(" or "))
        raise TopologyError(f"--topology {name!r}: {chip.name} takes {forms} ({what}), e.g. {_EXAMPLE[chip.name]}")
    if 0 in dims:
        raise TopologyError(f"--topology {name!r}: every number must be at least 1, e.g. {_EXAMPLE[chip.name]}")
    return Topology(text, chip, dims)


def _installed(module: str) -> bool:
    """Whether `module` can be imported (find_spec raises instead of answering when a parent package is missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def host_topology(topology: Topology) -> Topology:
    """One host's chips of `topology` as a topology of their own (`v5e:4x8` -> `v5e:2x2`, `h100:2x8` -> `h100:8`)."""
    if topology.chip.platform == "gpu":
        return parse(f"{topology.chip.name}:{topology.dims[-1]}")
    host = topology.host[:len(topology.dims)]
    return parse(f"{topology.chip.name}:{'x'.join(str(h) for h in host)}")


def devices(topology: Topology) -> list:
    """The slice's chips as compile-only jax devices (they run nothing)."""
    if topology.chip.platform == "gpu":
        return _gpu_devices(topology)
    if not _installed("libtpu"):
        raise TopologyError(f"--topology {topology.name} compiles with the TPU compiler in libtpu, which is not "
                            f"installed: pip install -e '.[tpu]' (or drop --topology)")
    # libtpu takes a lockfile per machine; several compile-only users (a dry run beside the tests) may share it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    with tempfile.TemporaryFile() as log, _stderr_to(log):  # libtpu's start-up warnings: no TPU VM here
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                                chip_config_name="default", chips_per_host_bounds=topology.host,
                                                num_slices=1)
        except Exception as e:  # noqa: BLE001 - libtpu's own message names the problem
            error = str(e).strip().splitlines()[0]
        else:
            return list(desc.devices)
    raise TopologyError(f"--topology {topology.name}: libtpu could not describe this slice: {error}")


def _gpu_devices(topology: Topology) -> list:
    """Compile-only H100s from the CUDA PJRT plugin and H100_TARGET_CONFIG (openxla/xla PR 16913).
    Without CUDA on the machine the plugin registers only when its version check is skipped
    (JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, which kd_jax.base.cli sets for --topology before jax starts)."""
    if not _installed("jax_plugins.xla_cuda12"):
        raise TopologyError(f"--topology {topology.name} compiles with XLA's GPU compiler in the CUDA plugin, which "
                            f"is not installed: pip install -e '.[cuda]' (or drop --topology)")
    from jax.experimental import topologies
    hosts = topology.dims[0] if len(topology.dims) == 2 else 1
    with tempfile.TemporaryFile() as log, _stderr_to(log):  # the plugin's "no CUDA driver" notice
        try:
            desc = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                                topology=f"1x{hosts}x{topology.dims[-1]}")
        except Exception as e:  # noqa: BLE001 - the plugin's own message names the problem
            raise TopologyError(f"--topology {topology.name}: the CUDA plugin could not describe these GPUs: "
                                f"{str(e).strip().splitlines()[0]}") from None
    # cuDNN attention asks libcudnn for its version while tracing; none is here, and nothing runs:
    # the version the target config names (9.3) stands in.
    from jax._src.cudnn import fused_attention_stablehlo
    fused_attention_stablehlo.check_cudnn_version = lambda: 90300
    return list(desc.devices)


@contextlib.contextmanager
def _stderr_to(file):
    """Send file descriptor 2 (where libtpu's C++ logs go) to `file` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cost(compiled) -> dict[str, float]:
    """The compiler's FLOPs and HBM bytes of one call of `compiled`, per chip ({} when it gives none)."""
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else None
    if not c:
        return {}
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def roofline(chip: Chip, flops: float, bytes_accessed: float, tokens: int, model_flops: float,
             chips: int) -> dict[str, float]:
    """The floor of one call's time on `chip` from the compiler's per-chip FLOPs and bytes: the larger
    of FLOPs / peak bf16 and bytes / HBM bandwidth; the tokens/s of the slice (`tokens` per call) and
    the MFU (`model_flops` per call over all chips) that floor implies. A floor, not a speed."""
    compute_s = flops / chip.peak_flops
    memory_s = bytes_accessed / chip.hbm_bytes_per_s
    floor = max(compute_s, memory_s)
    return {"compute_s": compute_s, "memory_s": memory_s, "floor_s": floor,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "tokens_per_s": tokens / floor if floor else float("inf"),
            "mfu": model_flops / (floor * chips * chip.peak_flops) if floor else float("nan")}
