"""Shared test setup: 8 fake CPU devices (for mesh tests) and a tiny config."""

import contextlib
import os
import signal
import tempfile

# 8 fake CPU devices; and the cheapest XLA:CPU compilation, since the suite's tiny programs spend
# far longer compiling than running: no LLVM optimisation (test_moe + test_block: 237 s of CPU with
# the default level, 135 s without), and XLA's classic fusion emitters in place of the MLIR ones,
# whose fixed cost per program dominates the many small programs (test_block: 71 s against 50 s;
# the whole suite: 1902 s of CPU against 1239 s on the 2-core host). Floating-point semantics are
# the same (XLA:CPU compiles without fast-math either way). Subprocesses inherit the flags.
_LIBTPU_UNKNOWN = "--xla_cpu_use_fusion_emitters=false"  # XLA:CPU only: libtpu aborts on it
_CPU_FLAGS = f"--xla_backend_optimization_level=0 {_LIBTPU_UNKNOWN}"
_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag in ["--xla_force_host_platform_device_count=8", *_CPU_FLAGS.split()]:
  if _flag.split("=")[0] not in _FLAGS:  # a value given in XLA_FLAGS is kept
    _FLAGS += " " + _flag
os.environ["XLA_FLAGS"] = _FLAGS.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs on CPUs; libtpu (installed for the TPU-compiler tests, which ask for compile-only
# TPU devices themselves) would otherwise probe for TPU chips in every process. JAX_PLATFORMS=cuda
# (or tpu) runs the accelerator-only tests on such a machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run, both xdist workers and every subprocess (trainers,
# notebooks) included: the tiny programs many tests share are compiled once. The cache is keyed by
# the program, the compiler version and its flags, so a hit is the same executable.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"llada_jax_tests_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}",
        "jax_cache",
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from llada_jax.config import default_config, validate  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@contextlib.contextmanager
def tpu_compiler_flags():
  """XLA_FLAGS without the XLA:CPU flags that libtpu does not know: it reads XLA_FLAGS when it
  first compiles, and aborts the process on a flag it does not know."""
  flags = os.environ["XLA_FLAGS"]
  os.environ["XLA_FLAGS"] = flags.replace(_LIBTPU_UNKNOWN, "")
  try:
    yield
  finally:
    os.environ["XLA_FLAGS"] = flags


@contextlib.contextmanager
def preempted_at(step: int):
  """Runs the trainer inside as if SIGTERM came at `step`: it saves that step and returns, as a
  preempted run does (same config, so a rerun resumes the very same programs)."""
  from llada_jax.training import preemption  # pylint: disable=g-import-not-at-top

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(preemption.PreemptionWatcher, "reached", lambda self, at: at >= step)
    yield


def cli_env(**extra: str) -> dict[str, str]:
  """The environment of a command-line subprocess (trainer, sampler, ...): this process's (its
  compilation cache included), on one CPU device, compiled as cheaply as the suite (a tiny trainer:
  14.5 s against 18.1 s at the default optimisation level on the 2-core host), TF quiet; `extra`
  on top."""
  return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=_CPU_FLAGS,
      TF_CPP_MIN_LOG_LEVEL="3",
      **extra,
  )


def default_sigint() -> None:
  """preexec_fn of a subprocess a test interrupts with SIGINT: the default handler (Python's
  KeyboardInterrupt), since a shell script's `cmd &` starts the suite, and so its children, with
  SIGINT ignored, which the commands rightly leave alone."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_tiny_config(**model_overrides) -> ml_collections.ConfigDict:
  """A model small enough to compile and run in a second or two on one CPU core."""
  c = default_config()
  c.model.update(
      dict(
          d_model=64,
          n_layers=2,
          n_heads=4,
          n_kv_heads=2,
          mlp_hidden_size=128,
          max_sequence_length=64,
      )
  )
  c.model.update(model_overrides)
  c.diffusion.objective = "arm" if c.model.causal else "mdm"
  c.data.update(dict(sequence_length=32, batch_size=8, shuffle_buffer=64))
  c.optimizer.update(dict(warmup_steps=2, peak_lr=3e-3))
  c.train.update(dict(num_steps=4, log_every=2, eval_every=4, eval_batches=1))
  c.checkpoint.update(dict(save_every=2, keep=2, async_save=False))
  c.sampling.update(dict(steps=8, gen_length=16, block_length=8))
  return validate(c)


def write_workdir(path, config: ml_collections.ConfigDict):
  """A workdir holding step 0 (random weights, fresh optimizer state) of `config`'s model, made on
  one device whatever the config's batch and mesh."""
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, _ = create_train_state(
      config, model, tx, make_mesh(config, jax.devices()[:1], check_batch=False)
  )
  saver = checkpoint.Checkpointer(path, config)
  saver.save(0, state, force=True)
  saver.wait()
  saver.close()
  return path


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
  return make_tiny_config()


# The modules of most test time first (seconds of one worker, 2-core host, `make test`, December
# 2026): `--dist loadscope` hands each worker whole modules in collection order, so a long module
# collected last (alphabetically, test_survive) kept one worker busy while the other idled.
# Longest first is the classic fix; modules not listed (under 10 s) keep their order after these.
# pytest-xdist >= 3.8 sorts the modules by their number of tests instead unless told
# `--no-loadscope-reorder` (the Makefile does): test_survive started 132 s in, and the workers
# ended 41 s apart (pytest 687 s; with this order, 0.5 s apart and 584 s).
_LONGEST_FIRST = (
    "test_survive",  # 143
    "test_evaluation",  # 95
    "test_posttrain",  # 78
    "test_moe",  # 66
    "test_scale",  # 60
    "test_cli",  # 58
    "test_tpu_compile",  # 55
    "test_block",  # 44
    "test_lm_eval_adapter",  # 41
    "test_batch_invariance",  # 40
    "test_notebooks",  # 36
    "test_data",  # 35
    "test_sampling",  # 32
    "test_preprocess",  # 29
    "test_sweep",  # 28
    "test_export_faithful",  # 27
    "test_arm_generation",  # 27
    "test_dpo",  # 26
    "test_train",  # 26
    "test_grpo",  # 25
    "test_init_from",  # 24
    "test_alignment",  # 23
    "test_objectives",  # 23
    "test_llada2_moe",  # 22
    "test_sampler_reference",  # 22
    "test_model",  # 21
    "test_merge",  # 20
    "test_benchmarks",  # 19
    "test_seqio_tasks",  # 18
    "test_storage",  # 14
    "test_faults",  # 14
    "test_rough_edges",  # 13
    "test_attention",  # 13
    "test_analysis",  # 12
    "test_llama_import",  # 12
    "test_hf",  # 11
    "test_likelihood",  # 11
    "test_chat",  # 11
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
